"""Retrieval heads (methods.md §1): scoring rule, success filter, planted copying head, resume, bad input."""
import json

import numpy as np
import pytest
import torch

from analyses import run
from analyses.retrieval import RETRIEVAL, RetrievalConfig, RetrievalResult, build_prompt, head_scores, sample_events
from analyses.retrieval.harness import Needle, locate_span, rouge1_recall
from analyses.retrieval.run import run_sample
from probe import families, load_model
from probe.errors import ContextLengthError, InputError


def test_argmax_in_span_with_matching_token_scores_one_over_span():
    prompt = [5, 6, 7, 8, 9, 10]            # span [2, 5) holds tokens 7, 8, 9
    new = [8, 7]                            # emitted tokens; rows at positions 5 (-> 8) and 6 (-> 7)
    argmax = torch.tensor([[[3, 2],          # head 0: in span, tokens match twice -> 2/3
                            [3, 3],          # head 1: in span, second row's token 8 != 7 -> 1/3
                            [0, 1],          # head 2: outside the span -> 0
                            [4, 4]]])        # head 3: in span but token 9 never emitted -> 0
    ev = sample_events(argmax, [5, 6], prompt, new, (2, 5))
    assert ev[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])


def test_outside_span_with_matching_token_is_not_an_event():
    prompt = [8, 6, 7, 8]                   # token 8 at 0 (outside) and 3 (inside span [2, 4))
    ev = sample_events(torch.tensor([[[0], [3]]]), [3], prompt, [8], (2, 4))
    assert ev[0].tolist() == [0.0, 0.5]


def test_consuming_row_reading_uses_the_next_row():
    prompt, new = [1, 2, 3, 4], [3, 3]
    argmax = torch.tensor([[[0, 2]]])       # row at pos 3 (produces w0) misses, row at pos 4 hits
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="producing").item() == pytest.approx(1.0)
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="consuming").item() == pytest.approx(1.0)
    argmax = torch.tensor([[[2, 0]]])
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="producing").item() == pytest.approx(1.0)
    assert sample_events(argmax, [3, 4], prompt, new, (2, 3), row="consuming").item() == 0.0
    with pytest.raises(InputError):
        sample_events(argmax, [3, 4], prompt, new, (2, 3), row="query")


def test_unsuccessful_samples_are_excluded():
    a, b = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    scores, n = head_scores([a, b, a * 0.5], [True, False, True])
    assert n == 2 and torch.allclose(scores, torch.full((2, 3), 0.75, dtype=torch.float64))
    scores, n = head_scores([a], [False])
    assert n == 0 and scores.abs().sum() == 0


def test_rouge1_recall():
    assert rouge1_recall("ride the yellow tram", "They ride the tram.") == pytest.approx(0.75)
    assert rouge1_recall("4817", "4817.") == 1.0 and rouge1_recall("4817", "4871") == 0.0


def _plant_copy_head(model, head: int, token: int, c: float = 30.0):
    """Make ``model`` always emit ``token`` and head (layer 0, ``head``) attend to keys holding it.

    Residual dim 0 is a constant 1 (nothing writes to it); residual dim 1 flags ``token``. RoPE is
    switched off so scores are pure content: head ``head`` queries dim 0 and its KV head keys on dim 1.
    """
    hf, dh = model.hf, model.d_head
    g = head // (model.n_heads // model.n_kv_heads)
    rotary = families.decoder(hf).rotary_emb  # a Llama: its RoPE, q/k projections and norms by name below
    with torch.no_grad():
        rotary.inv_freq.zero_()
        rotary.original_inv_freq.zero_()
        E = families.embedding(hf).weight
        s = float(E.std())  # keep the two planted dims at the embedding's own scale (no outlier token)
        E[:, 0], E[:, 1] = s, 0.0
        E[token, 1] = s
        for l, layer in enumerate(families.blocks(hf)):
            families.attention_out(hf, l).weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        at = families.attention(hf, 0)
        families.block(hf, 0).input_layernorm.weight[:2] = 1.0
        at.q_proj.weight[head * dh:(head + 1) * dh] = 0
        at.q_proj.weight[head * dh, 0] = c
        for sib in range(g * model.n_heads // model.n_kv_heads, (g + 1) * model.n_heads // model.n_kv_heads):
            if sib != head:
                at.q_proj.weight[sib * dh] = 0
        at.k_proj.weight[g * dh] = 0
        at.k_proj.weight[g * dh, 1] = c
        families.final_norm(hf).weight.zero_()
        families.final_norm(hf).weight[0] = 1.0
        families.unembedding(hf).weight.zero_()
        families.unembedding(hf).weight[token, 0] = 1.0


def test_planted_copying_head_is_detected():
    model = load_model("tiny-llama", device="cpu")  # a private copy: its weights are edited
    needle = Needle("z", "The password is ZZZ.", "What is the password?", "ZZZ", "The password is")
    token = model.tokenizer("Z", add_special_tokens=False).input_ids[0]
    _plant_copy_head(model, head=1, token=token)
    rec = run_sample(model, needle, 200, 50, max_new_tokens=4)
    assert model.tokenizer.decode(model.tokenizer("ZZZZ").input_ids) in rec["response"] or rec["response"] == "ZZZZ"
    ev = torch.tensor(rec["events"])
    span = rec["span"][1] - rec["span"][0]
    assert ev[0, 1].item() == pytest.approx(4 / span)   # one event per emitted token
    others = torch.cat([ev.flatten()[:1], ev.flatten()[2:]])
    assert (others < 0.1).all()                          # no other head copies


def test_resume_after_interruption_loses_nothing(tiny_llama, tmp_path, monkeypatch):
    cfg = RetrievalConfig(lengths=(200,), depths=(0, 100), needles=("code",), max_new_tokens=3, mask=False)
    full = run(RETRIEVAL, tiny_llama, cfg, store=tmp_path / "a", progress=False)
    import analyses.retrieval.run as stages
    real, calls = stages.run_sample, []

    def dying(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(stages, "run_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        run(RETRIEVAL, tiny_llama, cfg, store=tmp_path / "b", progress=False)
    assert len(list((tmp_path / "b" / "units" / "samples").glob("*"))) == 1
    monkeypatch.setattr(stages, "run_sample", lambda *a, **k: calls.append(2) or real(*a, **k))
    resumed = run(RETRIEVAL, tiny_llama, cfg, store=tmp_path / "b", progress=False)
    assert calls.count(2) == 1                      # only the unfinished cell ran again
    assert (resumed.scores == full.scores).all()
    assert resumed.samples["response"].tolist() == full.samples["response"].tolist()
    loaded = type(resumed).load(tmp_path / "b")
    assert (loaded.scores == resumed.scores).all() and len(loaded.to_frame()) == 2 * loaded.scores.size
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["n_samples"] == 2
    assert loaded.top == resumed.top and all(isinstance(h, type(resumed.top[0])) for h in loaded.top)


def test_changed_settings_recompute_only_what_they_determine(tiny_llama, tmp_path, capsys):
    cfg = RetrievalConfig(cells=(("code", 200, 50.0),), k=2, seeds=(0,), max_new_tokens=3)
    run(RETRIEVAL, tiny_llama, cfg, store=tmp_path, progress=False)
    sample = next((tmp_path / "units" / "samples").iterdir())
    stamp = sample.stat().st_mtime_ns
    run(RETRIEVAL, tiny_llama, RetrievalConfig(cells=cfg.cells, k=2, seeds=(1,), max_new_tokens=3),
        store=tmp_path, progress=False, force=True)
    assert sample.stat().st_mtime_ns == stamp       # another random-head seed: the samples are reused
    err = capsys.readouterr().err
    assert "resumed 1 of 1" in err and "masking: recomputing 1 unit" in err and "spec" in err
    run(RETRIEVAL, tiny_llama, RetrievalConfig(cells=cfg.cells, k=2, seeds=(1,), max_new_tokens=2),
        store=tmp_path, progress=False, force=True)
    assert sample.stat().st_mtime_ns != stamp and "settings" in capsys.readouterr().err


def test_bad_inputs(tiny_llama):
    needle = Needle("code", "The secret code is 4817.", "What is the code?", "4817", "The secret code is")
    with pytest.raises(InputError, match="depth"):
        build_prompt(tiny_llama, needle, 200, 120)
    with pytest.raises(InputError, match="depth"):
        build_prompt(tiny_llama, needle, 200, -5)
    with pytest.raises(ContextLengthError, match="context"):
        build_prompt(tiny_llama, needle, 1000, 50)
    long = Needle("long", "The code is 4817. " + "x" * 300, "What?", "4817")
    with pytest.raises(InputError, match="needle"):
        build_prompt(tiny_llama, long, 200, 50)
    with pytest.raises(InputError, match="locate"):
        locate_span(tiny_llama.tokenizer, [1, 2, 3], "4817")


def test_fast_design_matches_generate_with_stats(tiny_llama):
    """Prefill of all but the last token + decode rows == probe's generate with the last prefill row."""
    from analyses.retrieval.decode import decode, prefill
    from probe import KeyGroup, generate_with_stats, stop_ids

    needle = Needle("code", "The secret code is 4817.", "What is the code?", "4817", "The secret code is")
    p = build_prompt(tiny_llama, needle, 150, 50, max_new_tokens=6)
    past = prefill(tiny_llama, p.ids)
    new, st = decode(tiny_llama, p.ids, past, max_new_tokens=6, span=(p.start, p.stop))
    again, _ = decode(tiny_llama, p.ids, past, max_new_tokens=6)       # the cropped cache is reusable
    ref = generate_with_stats(tiny_llama, p.ids, max_new_tokens=6, stats_in_prefill="last", stop_at_newline=True,
                              groups=[KeyGroup("answer", p.start, p.stop)])
    assert new == again == ref.new_ids[0].tolist() and len(stop_ids(tiny_llama, newline=True)) > 0
    assert st.query_pos.tolist() == ref.stats.query_pos.tolist()
    assert torch.equal(st.argmax, ref.stats.argmax)


def test_masking_makes_the_planted_head_lose_its_events():
    from analyses.retrieval.decode import decode, prefill
    from probe import HeadId

    model = load_model("tiny-llama", device="cpu")
    needle = Needle("z", "The password is ZZZ.", "What is the password?", "ZZZ", "The password is")
    _plant_copy_head(model, head=1, token=model.tokenizer("Z", add_special_tokens=False).input_ids[0])
    p = build_prompt(model, needle, 200, 50, max_new_tokens=3)
    past, span = prefill(model, p.ids), (p.start, p.stop)
    ids = p.ids[0].tolist()
    events = {}
    for name, heads in (("none", []), ("top", [HeadId(0, 1)]), ("other", [HeadId(0, 3)])):
        new, st = decode(model, p.ids, past, max_new_tokens=3, span=span, heads=heads)
        events[name] = sample_events(st.argmax, st.query_pos, ids, new, span)
    assert events["none"][0, 1] > 0.5 and events["top"][0, 1] == 0.0      # uniform head: argmax leaves the span
    assert torch.equal(events["other"], events["none"])                  # masking another head changes nothing here


def test_masking_experiment_result_and_figures(tiny_llama, tmp_path):
    cfg = RetrievalConfig(lengths=(220,), depths=(0, 100), needles=("code",), k=2, seeds=(0, 1), max_new_tokens=3)
    res = run(RETRIEVAL, tiny_llama, cfg, store=tmp_path, progress=False)
    assert set(res.masking["condition"]) == {"top", "random0", "random1"} and len(res.masking) == 6
    top = set(res.top)
    for heads in res.random_sets.values():
        assert len(heads) == 2 and not top & set(heads)                # drawn outside the top set
    assert res.masking.groupby("condition").size().eq(2).all()
    rates = res.masking_rates()
    assert set(rates) == {"none", "top", "random0", "random1"} and all(0 <= v <= 1 for v in rates.values())
    frame = res.to_frame()
    assert set(frame["metric"]) == {"retrieval_score", "is_retrieval"} and len(frame) == 2 * 2 * 4
    assert len(res.grouped()) == 2 * tiny_llama.n_kv_heads
    for kind in ("heads", "grouped", "masking"):
        assert res.plot(kind).data
    assert res.plot("niah", condition="random").data[0].z.shape == (2, 1)
    figs = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"heads.html", "grouped.html", "niah_none.html", "niah_top.html", "niah_random.html",
            "plotly.min.js"} <= figs
    with pytest.raises(InputError):
        res.plot("pie")
    summ = res.summary()                                  # headlines with n and intervals (issue 18)
    assert res.events.shape == (2, 2, 4)
    assert summ["above"].n == (res.n_success or res.scores.size) and (summ["above"].ci is None) == (not res.n_success)
    t = res.masking_table().set_index("condition")
    assert summ["niah_top"].n == 2 and summ["niah_top"].ci == (t.loc["top", "lo"], t.loc["top", "hi"])
    assert summ["random0_minus_top"].value == t.loc["random0", "d_vs_top"] and "McNemar" in summ["random0_minus_top"].label
    back = RetrievalResult.load(tmp_path)
    assert np.array_equal(back.events, res.events) and back.summary()["above"].text() == summ["above"].text()


def test_cli_scan_retrieval_resumes(tmp_path, capsys):
    from analyses.cli import main

    argv = ["scan", "retrieval", "--model", "tiny-llama", "--lengths", "220", "--depths", "50",
            "--needles", "code", "--k", "2", "--seeds", "0", "--max-new-tokens", "2", "--no-png", "--out", str(tmp_path)]
    assert main(argv) == 0
    stamp = {f: f.stat().st_mtime_ns for f in (tmp_path / "units").rglob("*.*")}
    assert main(argv) == 0 and "top heads" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "units").rglob("*.*")} == stamp  # nothing recomputed
    assert main(argv[:-2] + ["--depths", "150", "--out", str(tmp_path)]) == 2                # bad depth: typed error


@pytest.mark.slow
def test_embedded_model_scores_match_eager_patterns(smol, reference_patterns):
    """On SmolLM2: our events equal those from eager full patterns of prompt + answer."""
    needle = [n for n in __import__("analyses.retrieval.harness", fromlist=["x"]).load_needles() if n.name == "code"][0]
    rec = run_sample(smol, needle, 300, 50, max_new_tokens=6)
    p = build_prompt(smol, needle, 300, 50, max_new_tokens=6)
    new = rec["new_ids"]
    T = p.ids.shape[1]
    full = torch.cat([p.ids, torch.tensor([new])], 1)
    pat = reference_patterns(smol, full)                               # [layer, head, T+n, T+n]
    argmax = pat[:, :, T - 1:T - 1 + len(new)].argmax(-1)
    ref = sample_events(argmax, list(range(T - 1, T - 1 + len(new))), p.ids[0].tolist(), new, (p.start, p.stop))
    ours = torch.tensor(rec["events"])
    assert rec["success"] and ours.max() > 0.5
    assert (ours - ref).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- haystacks (issue 18)

def _smol_tokenizer():
    from transformers import AutoTokenizer

    from probe.models.embedded import embedded_dir
    return AutoTokenizer.from_pretrained(str(embedded_dir(progress=False)))


def test_shipped_haystacks_are_long_distinct_and_never_repeat_within_the_longest_length():
    from analyses.retrieval import DEFAULT_LENGTHS
    from analyses.retrieval.harness import haystack_ids, load_haystack, load_needles

    tok, needles = _smol_tokenizer(), load_needles()
    names = [n.haystack for n in needles]
    assert len(needles) >= 3 and len(set(names)) == len(names)          # each needle its own haystack
    longest = max(DEFAULT_LENGTHS)
    assert longest >= 8000 and len(DEFAULT_LENGTHS) >= 6
    from analyses.retrieval import RetrievalConfig

    assert RetrievalConfig().lengths == DEFAULT_LENGTHS                 # the scan's default grid is this one
    for n in needles:
        paras = load_haystack(name=n.haystack)
        assert sum(len(p.split()) for p in paras) >= 8000               # >= 8k words per needle haystack
        assert len(set(paras)) == len(paras)
        text = tok.decode(haystack_ids(tok, paras, longest))
        used = [p.strip() for p in text.split("\n\n") if p.strip()]
        assert len(used) == len(set(used)) > 20                        # no paragraph twice at 8k tokens
        assert n.answer.lower() not in "\n".join(paras).lower()         # the answer only comes from the needle


def test_haystack_refuses_to_repeat_unless_asked(tiny_llama):
    from analyses.retrieval.harness import haystack_ids

    tok = tiny_llama.tokenizer
    paras = ["One short paragraph.", "Another short one."]
    with pytest.raises(InputError, match="repeat=True"):
        haystack_ids(tok, paras, 200)
    assert len(haystack_ids(tok, paras, 200, repeat=True)) == 200
    ids = haystack_ids(tok, paras, 5)
    assert ids == tok("\n\n".join(paras), add_special_tokens=False).input_ids[:5]     # reading order


def test_needle_is_separated_from_the_text_at_every_depth(tiny_llama):
    from analyses.retrieval.harness import _insert

    tok = tiny_llama.tokenizer
    hay = tok("Alpha beta gamma. Delta epsilon zeta. Eta theta.", add_special_tokens=False).input_ids
    needle = "The code is 4817."
    at0, at100 = _insert(tok, hay, needle, 0), _insert(tok, hay, needle, 100)
    assert at0.startswith(needle + " Alpha")                             # depth 0: no longer glued
    assert at100.endswith("Eta theta. " + needle)
    mid = _insert(tok, hay, needle, 50)
    assert " " + needle + " " in mid and mid.replace(" " + needle, "") == tok.decode(hay)
    for depth in (0, 25, 50, 75, 100):
        p = build_prompt(tiny_llama, Needle("code", needle, "What is the code?", "4817"), 200, depth,
                         max_new_tokens=3)
        text = tok.decode(p.ids[0].tolist())
        i = text.index(needle)
        assert (i == 0 or text[i - 1].isspace() or text[i - 1] == ">") and text[i + len(needle)].isspace()


def test_success_per_length_has_wilson_intervals_over_that_lengths_samples():
    import pandas as pd

    from analyses.inference import wilson
    from analyses.retrieval.stats import success_by

    rows = [{"needle": n, "length": L, "depth": d, "success": ok}
            for n in ("a", "b") for L, d, ok in ((500, 0, True), (500, 50, True), (8000, 0, False), (8000, 50, n == "a"))]
    t = success_by(pd.DataFrame(rows), "length").set_index("length")
    assert list(t.index) == [500, 8000] and list(t["n"]) == [4, 4] and list(t["k"]) == [4, 1]
    assert t.loc[8000, "success"] == 0.25 and t.loc[500, "success"] == 1.0
    w = wilson(1, 4)
    assert (t.loc[8000, "lo"], t.loc[8000, "hi"]) == (w.lo, w.hi) and t.loc[500, "hi"] == 1.0 > t.loc[500, "lo"]
    d = success_by(pd.DataFrame(rows), "depth").set_index("depth")
    assert list(d["k"]) == [2, 3]                                       # depth 0: 500 twice; depth 50: 500 twice + a@8000
    with pytest.raises(InputError, match="grid column"):
        success_by(pd.DataFrame(rows), "response")
    with pytest.raises(InputError):
        success_by(pd.DataFrame(rows).iloc[:0], "length")


def test_sparsity_and_masking_intervals():
    import numpy as np
    import pandas as pd

    from analyses.retrieval.stats import masking_table, sparsity_ci

    ev = np.zeros((4, 2, 2))
    ev[:, 0, 1] = 0.5                                    # one head of four always retrieves
    s = sparsity_ci(ev, [True, True, True, False], n_boot=200)
    assert (s.estimate, s.lo, s.hi, s.n) == (0.25, 0.25, 0.25, 3)
    with pytest.raises(InputError):
        sparsity_ci(ev, [False] * 4)
    cells = [("a", L, d) for L in (1, 2, 3) for d in (0, 50)]
    rows = [{"needle": n, "length": L, "depth": d, "condition": c, "success": ok}
            for (n, L, d), (top, r0, r1) in zip(cells, [(0, 1, 1), (0, 1, 0), (0, 1, 1), (1, 1, 1), (0, 0, 1),
                                                        (0, 1, 1)])
            for c, ok in (("top", top), ("random0", r0), ("random1", r1))]
    t = masking_table(pd.DataFrame(rows)).set_index("condition")
    assert t.loc["top", "success"] == pytest.approx(1 / 6) and t.loc["top", "n_cells"] == 6
    assert t.loc["random0", "d_vs_top"] == pytest.approx(4 / 6)       # 4 cells right under random0, wrong under top
    assert t.loc["random0", "p_vs_top"] == pytest.approx(2 / 16)      # McNemar: 4 vs 0 discordant
    assert t.loc["random (pooled)", "success"] == pytest.approx((5 + 5) / 12)
    assert 0 <= t.loc["top", "lo"] <= t.loc["top", "success"] <= t.loc["top", "hi"]
    with pytest.raises(InputError):
        masking_table(pd.DataFrame(rows)[lambda d: d.condition != "top"])


def test_the_shipped_run_covers_the_full_context_grid_with_masking_on_every_length():
    """data/retrieval/smollm2-135m is the README's run: >= 6 lengths up to 8k x >= 5 depths x >= 3 needles
    (every cell present), masking on every length, and every headline with its n and interval."""
    from analyses.data import data_path

    r = RetrievalResult.load(data_path("retrieval", "smollm2-135m"))
    s = r.samples
    lengths, depths, needles = sorted(s.length.unique()), sorted(s.depth.unique()), sorted(s.needle.unique())
    assert len(lengths) >= 6 and max(lengths) >= 8000 and len(depths) >= 5 and len(needles) >= 3
    assert len(s) == len(lengths) * len(depths) * len(needles)                # the whole grid, no cell missing
    assert sorted(r.masking.length.unique()) == lengths
    assert set(r.masking.condition) == {"top"} | {f"random{i}" for i in range(3)}
    summary = r.summary()
    for key in ("above", "niah_none", "niah_top", "random0_minus_top"):
        assert summary[key].ci is not None and summary[key].n, key
