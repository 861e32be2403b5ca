"""The cross-analysis study (issue 19) on a tiny model with planted heads, plus its statistics, files and CLI.

The planted model (2 layers x 32 heads, head_dim 32, RoPE; MLPs silenced; every other head has random
queries and keys but writes nothing):
  * L0H0, previous-token: fast RoPE frequencies put its attention on position p-1; it writes that
    token's identity into the "previous token" subspace;
  * L1H1, induction **and** copying: its query (the current token) matches keys holding the previous-token
    identity (slow frequencies), and it copies the attended token into the subspace the unembedding reads;
  * L1H2, a sink: every query attends to the BOS token;
  * L1H3, independent: a duplicate-token head (attends to the earlier copy of the current token) whose
    output nothing reads.
"""
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from analyses import registry, run
from analyses.atlas import ATLAS, AtlasConfig, AtlasResult, head_card
from analyses.atlas.agreement import agreement_table, eta2_rows
from analyses.atlas.repeats import repeated_sequence, sequence_scores
from analyses.atlas.scores import Score
from analyses.retrieval import RetrievalResult
from analyses.retrieval.decode import decode, prefill
from analyses.retrieval.scoring import sample_events
from probe import HeadId, InputError, families
from probe.heads import HeadLayout
from probe.models import Model, weights_fingerprint
from probe.models.tiny import byte_tokenizer
from probe.runtime import install

LETTERS = "abcdefghijklmnop"
PREV, COPY, SINK, INDEPENDENT = HeadId(0, 0), HeadId(1, 1), HeadId(1, 2), HeadId(1, 3)
H, D, HIDDEN = 32, 32, 128


def _plant(hf, ids, bos):
    theta = families.decoder(hf).rotary_emb.inv_freq.clone()     # a Llama: its RoPE and norms by name below
    g = torch.Generator().manual_seed(1)
    for p in hf.parameters():
        p.zero_()
    for layer in range(2):
        block = families.block(hf, layer)
        block.input_layernorm.weight.fill_(1.0)
        block.post_attention_layernorm.weight.fill_(1.0)
        a = families.attention(hf, layer)                     # background heads: random patterns, no output
        a.q_proj.weight.copy_(torch.randn(a.q_proj.weight.shape, generator=g) * 0.3)
        a.k_proj.weight.copy_(torch.randn(a.k_proj.weight.shape, generator=g) * 0.3)
    families.final_norm(hf).weight.fill_(1.0)
    E, U = families.embedding(hf).weight, families.unembedding(hf).weight
    E[:, 0], E[:, HIDDEN - 1] = 1.0, 1.0                      # dim 0 constant; the last dim evens the norms
    for k, ch in enumerate(LETTERS):
        E[ids[ch], HIDDEN - 1], E[ids[ch], 1 + k] = 0.0, 1.0  # dims 1..16: identity
        U[ids[ch], 33 + k] = 1.0                              # dims 33..48: read by the unembedding
    E[bos, HIDDEN - 1], E[bos, 49] = 0.0, 1.0                 # dim 49: "this is the BOS"
    a0, a1 = families.attention(hf, 0), families.attention(hf, 1)
    o0, o1 = families.attention_out(hf, 0).weight, families.attention_out(hf, 1).weight
    for head, a in ((PREV, a0), (COPY, a1), (SINK, a1), (INDEPENDENT, a1)):
        a.q_proj.weight[head.head * D:(head.head + 1) * D] = 0
        a.k_proj.weight[head.head * D:(head.head + 1) * D] = 0
    h = PREV.head * D                                         # score ~ sum_i cos(theta_i (p - j - 1))
    for i in range(6):
        a0.q_proj.weight[h + i, 0] = 6.0
        a0.k_proj.weight[h + i, 0] = 6.0 * float(torch.cos(theta[i]))
        a0.k_proj.weight[h + i + D // 2, 0] = 6.0 * float(torch.sin(theta[i]))
    for k in range(16):
        a0.v_proj.weight[h + k, 1 + k] = 1.0
        o0[17 + k, h + k] = 0.2                               # -> dims 17..32: the previous token
    slow = list(range(8, 16)) + list(range(24, 32))           # RoPE barely turns these over the prompts
    h = COPY.head * D
    for k in range(16):
        a1.q_proj.weight[h + slow[k], 1 + k] = 3.0
        a1.k_proj.weight[h + slow[k], 17 + k] = 3.0 / 0.2
        a1.v_proj.weight[h + k, 1 + k] = 1.0
        o1[33 + k, h + k] = 0.5                               # copies into the logits
    h = SINK.head * D
    a1.q_proj.weight[h + 15, 0] = 4.0
    a1.k_proj.weight[h + 15, 49] = 4.0
    h = INDEPENDENT.head * D
    for k in range(16):
        a1.q_proj.weight[h + slow[k], 1 + k] = 3.0
        a1.k_proj.weight[h + slow[k], 1 + k] = 3.0
        a1.v_proj.weight[h + k, 1 + k] = 1.0
        o1[50 + k, h + k] = 0.2                               # read by nothing


def planted_model() -> Model:
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=H, num_key_value_heads=H, head_dim=D, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        _plant(hf, {ch: tok.convert_tokens_to_ids(ch) for ch in LETTERS}, tok.bos_token_id)
    install(hf)
    return Model(hf=hf, tokenizer=tok, model_id="planted", source="planted", layout=HeadLayout(2, H, H), n_ctx=256,
                 weights_hash=weights_fingerprint(hf))


def letter_range(model) -> tuple[int, int]:
    ids = [model.tokenizer.convert_tokens_to_ids(ch) for ch in LETTERS]
    assert ids == list(range(ids[0], ids[0] + 16))
    return ids[0], ids[0] + 16


def copy_scores(model, folder, n=10):
    """A retrieval result scored by the retrieval analysis' own code: greedy continuations of a prefix of a
    letter sequence seen before, copy-paste events counted against that earlier sequence (the "needle")."""
    events, rows = [], []
    for i in range(n):
        x = repeated_sequence(model, 8, seed=7, index=i, token_range=letter_range(model), bos="yes")[:, :12]
        new, st = decode(model, x, prefill(model, x), max_new_tokens=4, span=(1, 9))
        ok = new == x[0, 4:8].tolist()
        events.append(sample_events(st.argmax, st.query_pos, x[0].tolist(), new, (1, 9)).numpy())
        rows.append({"needle": f"letters{i}", "length": 12, "depth": 0.0, "success": ok, "recall": float(ok)})
    ev = np.stack(events)
    ok = np.array([r["success"] for r in rows])
    RetrievalResult(model.model_id, ev[ok].mean(0), model.n_kv_heads, 0.1, pd.DataFrame(rows), meta={"k": 1},
                    events=ev).save(folder)


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def study(planted, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    copy_scores(planted, root / "retrieval-planted")
    cfg = AtlasConfig(results=(str(root),), shipped=False, analyses=("retrieval",), n_sequences=12, seq_len=8,
                      token_range=letter_range(planted), bos="yes", k=1, n_boot=300, n_perm=500,
                      roles=("retrieval", "induction", "previous_token", "duplicate_token"), tasks=("induction", "loss"),
                      n_random=5, n_items=24, induction_len=12, loss_texts=1, loss_tokens=32, reference_texts=2)
    out = root / "atlas-planted"
    return run(ATLAS, planted, cfg, store=out, progress=False), cfg, out


def _pair(res, a, b):
    t = res.agreement
    hit = t[((t.score_a == a) & (t.score_b == b)) | ((t.score_a == b) & (t.score_b == a))]
    assert len(hit) == 1, (a, b)
    return hit.iloc[0]


def test_the_planted_model_has_its_roles(planted):
    low, high = letter_range(planted)
    s = [sequence_scores(planted, repeated_sequence(planted, 8, seed=0, index=i, token_range=(low, high), bos="yes"), 8)
         for i in range(4)]
    best = {k: HeadId(*np.unravel_index(np.mean([x[k] for x in s], 0).argmax(), (2, H))) for k in s[0]}
    assert best == {"previous_token": PREV, "induction": COPY, "first_token_mass": SINK, "duplicate_token": INDEPENDENT}
    x = repeated_sequence(planted, 12, seed=5, index=0, token_range=(low, high), bos="yes")
    assert torch.equal(planted.hf(x).logits[0, 13:24].argmax(-1), x[0, 14:25])        # it does induction


def test_agreement_finds_the_planted_overlap_and_not_the_independent_head(study):
    res = study[0]
    shared = _pair(res, "retrieval: retrieval score", "atlas: induction")
    assert shared.jaccard == 1.0 and shared.shared == str(COPY)                          # one head, both roles
    assert shared.null_jaccard < 0.1 and shared.p_overlap < 0.1                        # beyond a layer-keeping null
    assert shared.resampled.startswith("items") and shared.jaccard_lo == 1.0          # stable over prompts
    for other in ("atlas: duplicate_token", "atlas: first_token_mass", "atlas: previous_token"):
        for role in ("retrieval: retrieval score", "atlas: induction"):
            assert _pair(res, other, role).jaccard == 0.0, (other, role)              # no false overlap
    assert str(INDEPENDENT) not in " ".join(res.agreement["shared"].fillna(""))
    same = _pair(res, "atlas: induction", "atlas: previous_token")
    assert same.resampled == "items (shared)"                                          # same sequences, resampled together


def test_transfer_shows_the_planted_dependency_beyond_random_heads(study):
    t = study[0].transfer.set_index(["role", "task"])
    for role in ("induction", "previous_token", "retrieval"):       # the copier itself, its input, the copier (uniform)
        cell = t.loc[(role, "induction")]
        assert cell.beyond_random and cell.drop_top > 0.7 and cell.drop_lo > 0.4, role
        assert abs(cell.drop_random) < 0.05 and cell.n_random == 5
    indep = t.loc[("duplicate_token", "induction")]
    assert not indep.beyond_random and abs(indep.drop_top) < 0.05                        # the independent head
    sets = study[0].sets
    assert sets["induction"]["top"] == (COPY,) and all(h.layer == 1 and h != COPY for s, hs in sets["induction"].items()
                                                        if s != "top" for h in hs)   # layer-matched controls


def test_rerun_resumes_and_a_changed_setting_recomputes_only_its_units(study, planted, capsys, tmp_path):
    import shutil

    res, cfg, first = study
    out = shutil.copytree(first, tmp_path / "atlas")                 # the module's study stays as it was
    again = run(ATLAS, planted, cfg, store=out, progress=False)
    err = capsys.readouterr().err
    assert "recomputing" not in err and "atlas/transfer: resumed 50 of 50" in err
    pd.testing.assert_frame_equal(again.transfer, res.transfer)
    run(ATLAS, planted, dataclasses.replace(cfg, n_random=6, min_draws=5, n_boot=100), store=out, progress=False,
        force=True)
    err = capsys.readouterr().err
    assert "resumed 50 of 58" in err and "atlas/repeats: resumed 12 of 12" in err


def test_saved_study_loads_and_keeps_the_contract(study):
    res, _, out = study
    back = registry.load_result(out)
    assert isinstance(back, AtlasResult)
    pd.testing.assert_frame_equal(back.agreement, res.agreement)
    pd.testing.assert_frame_equal(back.to_frame(), res.to_frame())
    assert np.array_equal(back.score("atlas: induction").items, res.score("atlas: induction").items)
    assert back.sets == res.sets and set(back.head_scores()) == {"induction", "previous_token", "duplicate_token",
                                                                 "first_token_mass"}
    for kind in ("agreement", "overlap", "transfer", "scores"):
        assert back.plot(kind).data
    assert (out / "figures" / "transfer.html").exists()
    assert {"beyond", "strongest"} <= set(back.summary())


def test_head_card_of_the_planted_copier(study, planted):
    card = head_card(study[0], "L1H1", model=planted, text="zabcdefgh abcdefgh")
    rows = card.scores.set_index("score")
    assert rows.loc["atlas: induction", "rank"] == 1 and rows.loc["retrieval: retrieval score", "rank"] == 1
    assert rows.loc["atlas: induction", "percentile"] == pytest.approx(100 * (2 * H - 0.5) / (2 * H))
    assert any(r.startswith("induction") for r in card.roles) and any("retrieval" in r for r in card.roles)
    top = card.cells[card.cells.condition == "top"]
    assert set(top.role) == {"induction", "retrieval"} and top.beyond_random.any()
    assert {"scores", "pattern", "transfer"} <= set(card.plots()) and card.plot("pattern").data
    assert card.pattern.block == 1 and "rank   1/64" in card.text()
    frame = card.to_frame()
    assert set(frame.columns) >= {"layer", "head", "metric", "value", "rank", "percentile"}
    with pytest.raises(InputError, match="out of range"):
        head_card(study[0], "L5H0")


# ----------------------------------------------------------------------------- the statistics

def test_streaming_scores_equal_the_full_patterns(tiny_llama, reference_patterns):
    for bos, n in (("no", 10), ("yes", 5)):                 # 19 keys: two streamed passes; a BOS shifts the copies
        ids = repeated_sequence(tiny_llama, n, seed=3, index=1, bos=bos)
        got = sequence_scores(tiny_llama, ids, n)
        A = reference_patterns(tiny_llama, ids).double()
        T, o = ids.shape[1], ids.shape[1] - 2 * n
        i, rows = torch.arange(o + n, T), torch.arange(1, T)
        want = {"induction": A[..., i, i - n + 1].mean(-1), "duplicate_token": A[..., i, i - n].mean(-1),
                "previous_token": A[..., rows, rows - 1].mean(-1), "first_token_mass": A[..., rows, 0].mean(-1)}
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v.numpy(), atol=1e-5, err_msg=k)
    with pytest.raises(InputError, match="two equal copies"):
        sequence_scores(tiny_llama, torch.tensor([[5, 6, 7, 8]]), 2)


def test_rank_statistics_against_scipy():
    from scipy.stats import kruskal, spearmanr

    rng = np.random.default_rng(0)
    x, g = rng.random(60), rng.integers(0, 4, 60)
    h = kruskal(*[x[g == k] for k in range(4)]).statistic
    assert eta2_rows(np.argsort(np.argsort(x))[None] + 1.0, g[None])[0] == pytest.approx(h / 59)
    a, b = rng.random((6, 5)), rng.random((6, 5))
    t = agreement_table([Score("a", "s", a), Score("b", "t", b)], n_boot=50, n_perm=50)
    assert t.value[0] == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic)


def test_within_layer_null_removes_a_shared_depth_trend():
    """Two scores that only share a trend over layers: Spearman is high, yet not beyond the within-layer null."""
    rng = np.random.default_rng(1)
    depth = np.repeat(np.arange(12.0)[:, None], 8, 1)
    a, b = depth + rng.normal(0, 0.5, (12, 8)), depth + rng.normal(0, 0.5, (12, 8))
    r = agreement_table([Score("a", "s", a), Score("b", "t", b)], n_boot=100, n_perm=400).iloc[0]
    assert r.value > 0.8 and r.p_perm < 0.01 and r.p_layer > 0.05


def test_item_intervals_cover_the_noise_free_agreement():
    """Per-item noise attenuates a correlation of means (here 0.84 for a noise-free 0.99); the basic interval
    corrects for that and covers the noise-free value (a percentile interval lies below the estimate)."""
    rng = np.random.default_rng(2)
    truth = rng.random((10, 12))
    items = truth[None] + rng.normal(0, 0.6, (12, 10, 12))
    other = truth + rng.normal(0, 0.05, (10, 12))
    r = agreement_table([Score("a", "s", items.mean(0), items, "a"), Score("b", "t", other)], n_boot=400,
                        n_perm=50).iloc[0]
    from scipy.stats import spearmanr

    clean = spearmanr(truth.ravel(), other.ravel()).statistic
    assert r.value < clean - 0.1 and r.lo <= clean <= r.hi


# ----------------------------------------------------------------------------- inputs, sources, CLI

def test_missing_results_are_refused_with_the_command_to_run(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="headwise scan similarity --model tiny-llama"):
        run(ATLAS, tiny_llama, AtlasConfig(results=(str(tmp_path),), shipped=False, analyses=("similarity",),
                                           transfer=False), store=tmp_path / "atlas", progress=False)
    assert not (tmp_path / "atlas" / "units").exists()                 # refused before any work
    with pytest.raises(InputError, match="unknown role"):
        AtlasConfig(roles=("nonsense",))
    with pytest.raises(InputError, match="need saved"):
        run(ATLAS, tiny_llama, AtlasConfig(analyses=("similarity",), roles=("retrieval",), results=(str(tmp_path),)),
            progress=False)


def test_run_missing_runs_the_small_config_and_reuses_it(tiny_llama, tmp_path, capsys):
    cfg = AtlasConfig(results=(str(tmp_path),), shipped=False, analyses=("similarity",), run_missing=True,
                      transfer=False, n_sequences=3, seq_len=4, n_boot=20, n_perm=20)
    res = run(ATLAS, tiny_llama, cfg, store=tmp_path / "atlas", progress=False)
    assert (tmp_path / "similarity-tiny-llama" / "summary.json").exists()
    assert "similarity: cos to next layer" in {s.name for s in res.scores}
    run(ATLAS, tiny_llama, cfg, store=tmp_path / "atlas", progress=False)
    assert "running similarity" not in capsys.readouterr().err.split("resumed")[-1]


def test_head_command_prints_the_card(results, capsys):
    from analyses.cli import main

    assert main(["head", "L1H2", "--results", str(results), "--model", "tiny-llama", "--no-pattern"]) == 0
    out = capsys.readouterr().out
    assert "L1H2 (KV group 1) on tiny-llama" in out and "retrieval: retrieval score" in out and "rank" in out
    assert main(["head", "L9H0", "--results", str(results), "--model", "tiny-llama"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["head", "H3", "--model", "tiny-llama"]) == 2


def test_atlas_page_and_its_head_card(results, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from streamlit.util import calc_hash

    APP = str(Path(__file__).resolve().parent.parent / "dashboards" / "app.py")
    monkeypatch.setenv("HEADWISE_DASHBOARD_MODEL", "tiny-llama")
    monkeypatch.setenv("HEADWISE_RESULTS", str(results))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app._page_hash = calc_hash("atlas")
    app.run()
    assert not app.exception and [t.value for t in app.title] == ["Cross-analysis study"]
    assert len(app.get("plotly_chart")) >= 4 and not app.error
    app.text_input(key="atlas:tool:card:head").set_value("L1H0")
    app.button(key="atlas:tool:card").click().run()
    assert not app.exception and "L1H0" in app.text_area(key="atlas:tool:card:text:card").value


def test_the_shipped_study_opens_and_names_the_largest_relative_drop():
    # the embedded model's study ships in data/atlas (issue 19); its headline cell compares tasks by the
    # drop beyond random relative to plain: raw drops mix units (IOI logits vs accuracies)
    from analyses import registry
    from analyses.data import data_dir

    res = registry.load_result(data_dir() / "atlas" / "smollm2-135m")
    assert res.model_id == "smollm2-135m" and len(res.transfer) and len(res.agreement)
    t = pd.DataFrame([{"role": "a", "task": "ioi", "n_items": 16, "plain": 5.0, "drop_top": 2.0, "drop_lo": 1.0,
                       "drop_hi": 3.0, "drop_random": 0.5, "excess": 1.5, "relative": 0.3, "beyond_random": True},
                      {"role": "b", "task": "niah", "n_items": 10, "plain": 0.9, "drop_top": 0.9, "drop_lo": 0.7,
                       "drop_hi": 1.0, "drop_random": 0.0, "excess": 0.9, "relative": 1.0, "beyond_random": True}])
    cell = dataclasses.replace(res, transfer=t).summary()["cell"]
    assert "knock out b -> niah" in cell.label and cell.value == 0.9 and cell.ci == (0.7, 1.0)


def test_the_act_task_of_a_shipped_sinks_result_is_the_task_file_it_carries(tmp_path):
    from analyses.atlas.run import act_task_of

    assert act_task_of("sentiment@large", tmp_path) == "sentiment@large"
    gone = str(tmp_path / "elsewhere" / "task.json")
    assert act_task_of(gone, tmp_path) == gone                      # nothing carried: the error names the path
    (tmp_path / "task.json").write_text("{}")
    assert act_task_of(gone, tmp_path) == str(tmp_path / "task.json")
    assert act_task_of("data/sinks/smollm2-135m/task.json", tmp_path) == "data/sinks/smollm2-135m/task.json"
