"""ACT (issue 5): calibration properties, sink detection, head search, calibration files, bad inputs."""
import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses import run
from analyses.sinks import (SINKS, Calibration, SinksConfig, apply_calibration, load_calibration, load_task,
                            profile_sinks, token_type)
from analyses.sinks.search import evaluate, evaluate_from, layer_inputs
from analyses.sinks.tasks import Item, Task, label_logprobs, label_token_ids, make_batches, task_batches
from probe import HeadId, InputError, InterventionSpec, ModelMismatchError, SinkCalibration, intervene
from probe.eager import calibrate, detect_sinks
from probe.atomic import write_json
from probe.errors import CorruptFileError


# ----------------------------------------------------------------------------- calibration properties

@st.composite
def rows_and_sinks(draw):
    K = draw(st.integers(2, 12))
    logits = torch.tensor(draw(st.lists(st.floats(-6, 6), min_size=K, max_size=K)), dtype=torch.float64)
    sinks = torch.tensor(draw(st.lists(st.booleans(), min_size=K, max_size=K)))
    beta = draw(st.floats(0.01, 1.0))
    return torch.softmax(logits, -1), sinks, beta


@settings(max_examples=200, deadline=None)
@given(rows_and_sinks())
def test_calibration_properties(case):
    probs, sinks, beta = case
    out = calibrate(probs, sinks, beta)
    assert torch.allclose(out.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)  # rows sum to 1
    rest = ~sinks
    if not rest.any():  # no non-sink mass: the row is left unchanged
        assert torch.equal(out, probs)
    else:
        assert torch.allclose(out[sinks], beta * probs[sinks])  # sinks scaled by beta
        ratio = out[rest] / probs[rest]  # one common factor: ratios among non-sinks preserved
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)
    assert torch.allclose(calibrate(probs, sinks, 1.0), probs, atol=1e-12)  # beta = 1: identity


@given(st.integers(2, 10), st.floats(0.01, 0.99))
def test_row_without_non_sink_mass_is_unchanged(K, beta):
    probs = torch.zeros(K, dtype=torch.float64)
    probs[0] = 0.7
    probs[-1] = 0.3
    sinks = torch.zeros(K, dtype=torch.bool)
    sinks[[0, -1]] = True
    assert torch.equal(calibrate(probs, sinks, beta), probs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=16), st.floats(0.05, 0.9))
def test_first_sink_is_left_untouched(means, tau):
    means = torch.tensor(means, dtype=torch.float64)
    count = torch.ones_like(means)
    every = detect_sinks(means, count, SinkCalibration(tau=tau, keep_first=False))
    kept = detect_sinks(means, count, SinkCalibration(tau=tau))
    assert torch.equal(every, means > tau)
    if every.any():
        first = int(torch.nonzero(every)[0])
        assert not kept[first] and kept.sum() == every.sum() - 1
        probs = torch.softmax(means, -1)
        out = calibrate(probs, kept, 0.4)
        assert out[first] >= probs[first]  # treated as a non-sink: never scaled down


# ----------------------------------------------------------------------------- sink detection

def test_planted_sink_found_by_both_rules():
    T = 10
    A = torch.zeros(T, T)
    A[0, 0] = 1.0
    for i in range(1, T):  # every row: 0.5 on key 0, 0.3 on planted key 4 once visible, the rest uniform
        A[i, 0] = 0.5
        rest = [j for j in range(1, i + 1) if j != 4]
        if i >= 4:
            A[i, 4] = 0.3
        A[i, rest] = (0.2 if i >= 4 else 0.5) / len(rest)
    A[T - 1] = 0.0
    A[T - 1, [0, 4, T - 1]] = torch.tensor([0.5, 0.2, 0.3])  # the last key: mean 0.3, but one query
    assert torch.allclose(A.sum(-1), torch.ones(T))
    col_sum, col_cnt = A.sum(0), torch.arange(T, 0, -1).double()
    tau = detect_sinks(col_sum.double(), col_cnt, SinkCalibration(tau=0.25, min_queries=3))
    assert torch.nonzero(tau).flatten().tolist() == [4]  # key 0 is the first sink and stays untouched
    alpha = detect_sinks(col_sum.double(), col_cnt, SinkCalibration(rule="alpha", alpha=2.5, min_queries=3))
    assert torch.nonzero(alpha).flatten().tolist() == [4]
    late = detect_sinks(col_sum.double(), col_cnt, SinkCalibration(tau=0.25, min_queries=1))
    assert 9 in torch.nonzero(late).flatten().tolist()  # the last key, seen by one query, passes on its own


def test_profile_matches_column_means_of_reference_patterns(tiny_llama, reference_patterns):
    text = "Hi. Ho, he!\nHa ha."
    prof = profile_sinks(tiny_llama, [text], tau=0.15)
    A = reference_patterns(tiny_llama, tiny_llama.encode(text))  # [L, H, T, T]
    T = A.shape[-1]
    mean = A.sum(2) / torch.arange(T, 0, -1)
    got = {(r.layer, r.head, r.pos) for r in prof.sinks.itertuples()}
    assert got == {tuple(x) for x in torch.nonzero(mean > 0.15).tolist()}
    firsts = prof.sinks[prof.sinks["first"]].groupby(["layer", "head"]).pos.min()
    assert (prof.sinks[prof.sinks["first"]].groupby(["layer", "head"]).size() == 1).all()
    assert all(p == prof.sinks[(prof.sinks.layer == l) & (prof.sinks["head"] == h)].pos.min()
               for (l, h), p in firsts.items())
    mass = prof.mass.groupby(["layer", "head"]).mass.sum()
    assert torch.allclose(torch.tensor(mass.values), torch.ones(len(mass), dtype=torch.float64), atol=1e-4)
    df = prof.to_frame()
    assert set(df.columns) == {"layer", "head", "metric", "value"} and prof.plot() is not None


def test_token_types():
    assert [token_type(p, i) for i, p in enumerate(["The", ".", "\n", " ", " cat", ","])] == [
        "first", "punctuation", "newline", "space", "other", "punctuation"]


# ----------------------------------------------------------------------------- tasks and batching

def test_batched_left_padding_matches_single_prompts(tiny_llama):
    prompts = ["ab", "hello there", "x y z w"]
    ids = [1, 0, 1]
    spec = InterventionSpec([SinkCalibration(heads=["L1H0", "L0H3"], beta=0.3)])
    with intervene(tiny_llama, spec):
        batched = label_logprobs(tiny_llama, make_batches(tiny_llama, prompts, [0] * 3, 8)[0], ids)
        single = torch.cat([label_logprobs(tiny_llama, make_batches(tiny_llama, [p], [0], 8)[0], ids)
                            for p in sorted(prompts, key=len)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_rerun_from_a_layer_equals_full_forward(tiny_llama):
    task = load_task("qtype")
    batches = task_batches(tiny_llama, task, "calib", 0, 8)[:2]
    lab = label_token_ids(tiny_llama.tokenizer, task.labels)
    spec = SinksConfig().spec([HeadId(1, 2)])
    full = evaluate(tiny_llama, batches, lab, spec)
    cache = layer_inputs(tiny_llama, batches, [1])
    assert evaluate_from(tiny_llama, batches, cache, 1, lab, spec) == pytest.approx(full, abs=1e-5)


def test_tasks_ship_with_disjoint_splits():
    for name in ("sentiment", "topic", "qtype"):
        t = load_task(name)
        texts = {s: {i.text for i in t.split(s)} for s in ("demo", "calib", "heldout")}
        assert not (texts["demo"] & texts["calib"] or texts["calib"] & texts["heldout"])
        assert len(t.labels) >= 2 and min(len(v) for v in texts.values()) > 0


# ----------------------------------------------------------------------------- the search

def _constructed_task(model, head: HeadId, beta: float) -> Task:
    """Gold label := the prediction with ``head`` calibrated. The two labels (letters) are the pair whose
    order the calibration flips most often; half the items flip, half do not, and near-ties are dropped.
    Calibrating ``head`` alone is then right on every item, the plain model only on the unflipped half."""
    import random
    import string

    rng = random.Random(0)
    texts = ["".join(rng.choice("xyzw .,") for _ in range(rng.randint(8, 20))) for _ in range(160)]
    letters = string.ascii_lowercase
    lab = [model.tokenizer(c, add_special_tokens=False).input_ids[0] for c in letters]
    batch = make_batches(model, [t + " " for t in texts], [0] * len(texts), 256)[0]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    plain = label_logprobs(model, batch, lab)
    with intervene(model, SinksConfig(act=SinkCalibration(beta=beta)).spec([head])):
        cal = label_logprobs(model, batch, lab)

    def flips(a, b):
        p, c = plain[:, a] - plain[:, b], cal[:, a] - cal[:, b]
        return ((p > 0) != (c > 0)) & (p.abs() > 1e-3) & (c.abs() > 1e-3)

    a, b = max(((a, b) for a in range(26) for b in range(a + 1, 26)), key=lambda ab: int(flips(*ab).sum()))
    f = flips(a, b)
    margin = cal[:, a] - cal[:, b]
    gold = [0 if float(x) > 0 else 1 for x in margin]
    flip = [Item(texts[order[r]], gold[r]) for r in range(len(texts)) if f[r]]
    same = [Item(texts[order[r]], gold[r]) for r in range(len(texts))
            if not f[r] and abs(float(margin[r])) > 1e-3 and abs(float(plain[r, a] - plain[r, b])) > 1e-3]
    assert len(flip) >= 6, "the constructed task needs items where the calibration changes the answer"
    k = len(flip) // 2
    items = {"demo": (), "calib": tuple(flip[:k] + same[:k]), "heldout": tuple(flip[k:] + same[k:2 * k])}
    return Task("constructed", (letters[a], letters[b]), items, "", "{x}")


def test_search_picks_the_head_that_helps(tiny_llama, tmp_path):
    head = HeadId(1, 3)
    cfg = SinksConfig(act=SinkCalibration(beta=0.05), first_layer=0, last_layer=1, n_random=5, n_profile=1)
    task = _constructed_task(tiny_llama, head, cfg.act.beta)
    res = run(SINKS, tiny_llama, replace(cfg, task=str(task.save(tmp_path / "constructed.json"))),
              progress=False).search
    row = next(r for r in res.candidates if r["head"] == str(head))
    assert row["accuracy"] == 1.0 and res.baseline["accuracy"] < 1.0
    assert head in res.selected
    assert res.heldout["calibrated"]["accuracy"] > res.heldout["plain"]["accuracy"]
    assert len(res.heldout["random"]) == 5 and all(len(r["heads"]) == len(res.selected) for r in res.heldout["random"])
    kept = {str(h) for h in res.selected}                    # the control draws outside the kept set (issue 18)
    draws = res.heldout["random"]
    if 8 - len(kept) > len(kept):                            # room for random sets outside: drawn there
        assert all(r["outside"] and not kept & set(r["heads"]) for r in draws)
    else:                   # the complement is one set: every seed would draw it, so all 8 candidates, flagged
        assert not any(r["outside"] for r in draws)
    assert len({tuple(r["heads"]) for r in draws}) > 1       # a control, not one set five times
    assert SinksConfig().n_random == 10
    df = res.to_frame()
    assert set(df.metric) >= {"accuracy", "delta_accuracy", "selected"} and res.plot() is not None


def test_search_resumes_from_its_units_and_reselects_by_gold_logprob(tiny_llama, tmp_path):
    from analyses.sinks import SinksResult
    from analyses.units import UnitStore

    cfg = SinksConfig(limit=10, first_layer=0, last_layer=1, n_random=2, n_profile=1)
    out = tmp_path / "r"
    first = run(SINKS, tiny_llama, cfg, store=out, progress=False)
    again = run(SINKS, tiny_llama, cfg, store=out, progress=False)
    assert again.search.to_dict() == json.loads((out / "search.json").read_text())
    assert first.search.selected == again.search.selected and (out / "search.parquet").exists()
    assert SinksResult.load(out).search.candidates == first.search.candidates
    # an interrupted run: the finished layer comes from its unit, the rest is computed
    store, layer = UnitStore(out), "layer-001"
    stamp = json.loads((out / "units" / "search" / f"{layer}.json").read_text())["stamp"]
    fake = store.get("search", layer)
    fake["rows"][0]["accuracy"] = 9.0
    (out / "units" / "search" / "layer-000.json").unlink()
    store.put("search", layer, stamp, fake)
    resumed = run(SINKS, tiny_llama, cfg, store=out, progress=False).search
    assert next(r for r in resumed.candidates if r["layer"] == 1)["accuracy"] == 9.0
    assert [r for r in resumed.candidates if r["layer"] == 0] == [r for r in first.search.candidates if r["layer"] == 0]
    # the gold-label log-probability rule: the same candidate units, another selection, a new held-out run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "units" / "search").iterdir()}
    by_lp = run(SINKS, tiny_llama, replace(cfg, selection="gold_logprob"), store=out, progress=False,
                force=True).search
    assert {p: p.stat().st_mtime_ns for p in (out / "units" / "search").iterdir()} == stamps
    gains = {r["head"]: r["gold_logprob"] - by_lp.baseline["gold_logprob"] for r in by_lp.candidates}
    assert {str(h) for h in by_lp.selected} == {h for h, g in gains.items() if g > 1e-4}
    assert by_lp.candidates == resumed.candidates and by_lp.config["selection"] == "gold_logprob"


# ----------------------------------------------------------------------------- calibration files

def test_calibration_file_round_trip_on_a_fresh_plain_hf_model(tiny_llama, tmp_path):
    from probe.models import tiny

    calib = Calibration.from_heads(tiny_llama, ["L1H0", "L0H2", "L1H3"], beta=0.2, tau=0.08, task="sentiment")
    path = calib.save(tmp_path / "calib.json")
    assert load_calibration(path) == calib
    ids = tiny_llama.encode("the cat sat on the mat.")
    with torch.no_grad(), intervene(tiny_llama, calib.spec()):
        expected = tiny_llama.hf(ids).logits
        expected_gen = tiny_llama.hf.generate(ids, max_new_tokens=6, do_sample=False)
    plain = tiny.tiny_llama().eval()  # a fresh plain HF model with the same seeded weights
    with torch.no_grad():
        before = plain(ids).logits
        handle = apply_calibration(plain, str(path))
        got = plain(ids).logits
        got_gen = plain.generate(ids, max_new_tokens=6, do_sample=False)
        handle.remove()
        after = plain(ids).logits
    assert torch.equal(got, expected) and torch.equal(got_gen, expected_gen)
    assert not torch.allclose(before, got) and torch.allclose(after, before, atol=1e-5)


def test_calibration_for_another_model_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    path = Calibration.from_heads(tiny_llama, ["L1H0"]).save(tmp_path / "c.json")
    with pytest.raises(ModelMismatchError, match="headwise scan sinks"):
        apply_calibration(tiny_gpt2, path)


@pytest.mark.parametrize("beta", [0.0, -0.2, 1.5])
def test_beta_outside_unit_interval_is_refused(tiny_llama, beta, tmp_path):
    with pytest.raises(InputError, match="beta"):
        Calibration.from_heads(tiny_llama, ["L1H0"], beta=beta)
    with pytest.raises(InputError, match="beta"):
        SinksConfig(act=SinkCalibration(beta=beta))
    with pytest.raises(InputError, match="beta"):
        from analyses.config import build
        build(SinksConfig, {"beta": str(beta)})                           # the --beta flag
    d = Calibration.from_heads(tiny_llama, ["L1H0"]).to_dict()
    d["edit"]["beta"] = beta
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(InputError, match="beta"):
        load_calibration(tmp_path / "c.json")


def test_unknown_task_and_corrupt_files(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="sentiment"):
        load_task("sst-99")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(CorruptFileError, match="scan sinks"):
        load_calibration(tmp_path / "other.json")


def test_cli_calibrate_and_generate(tmp_path, capsys):
    from analyses.cli import main

    out = tmp_path / "act"
    assert main(["calibrate", "--model", "tiny-llama", "--task", "qtype", "--out", str(out), "--first-layer", "1",
                 "--last-layer", "1", "--n-random", "1", "--n-profile", "1", "--selection", "gold_logprob"]) == 0
    calib = load_calibration(out / "calib.json")
    assert calib.task == "qtype" and calib.model_id == "tiny-llama" and "heldout_plain" in calib.figures
    assert json.loads((out / "search.json").read_text())["config"]["selection"] == "gold_logprob"
    assert main(["scan", "sinks", "--model", "tiny-llama", "--task", "qtype", "--out", str(out), "--first-layer",
                 "1", "--last-layer", "1", "--n-random", "1", "--n-profile", "1", "--selection", "gold_logprob"]) == 0
    assert "resumed" in capsys.readouterr().err                        # the alias and the scan share their units
    assert main(["generate", "--model", "tiny-llama", "--calibration", str(out / "calib.json"), "--max-new-tokens",
                 "3", "hi"]) == 0
    assert main(["calibrate", "--model", "tiny-llama", "--task", "nope", "--out", str(out)]) == 2
    assert main(["generate", "--model", "tiny-gpt2", "--calibration", str(out / "calib.json"), "hi"]) == 2
    assert "made for tiny-llama" in capsys.readouterr().err


def test_calibration_files_of_version_1_still_load(tiny_llama, tmp_path):
    v1 = {"format": "headwise.calibration", "version": 1, "model_id": "tiny-llama",
          "weights_hash": tiny_llama.weights_hash, "heads": ["L1H0"], "beta": 0.3, "tau": 0.1, "rule": "tau",
          "alpha": 5.0, "min_queries": 1, "keep_first": True, "task": "sentiment", "figures": {}}
    write_json(tmp_path / "c.json", v1)
    c = load_calibration(tmp_path / "c.json")
    assert c.heads == (HeadId(1, 0),) and c.edit.beta == 0.3 and c.task == "sentiment"


@pytest.mark.slow
def test_embedded_model_first_token_is_the_main_sink(smol):
    prof = profile_sinks(smol, ["Review: a warm, funny film.\nSentiment:"], min_queries=3)
    s = prof.summary()["token_types"]
    assert s["first"]["mean_mass"] > s["other"]["mean_mass"]
    assert s["first"]["share_of_first_sinks"] > 0.5


@pytest.mark.parametrize("chunk", [5, 64])
def test_separated_act_output_equals_calibrated_pattern_times_values(chunk):
    """The engine's fast ACT output (sink and non-sink accumulators apart) equals calibrate(A) @ V."""
    from probe import eager
    from probe.call import AttentionCall

    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 40, 8
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, 1, 1))
    k[:, :, 3] = 3 * q[0, 0].mean(0)  # a planted sink key
    plan = eager.LayerPlan(act={0: SinkCalibration(tau=0.05), 2: SinkCalibration(beta=0.1, tau=0.03, keep_first=False)})
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    mask[1, ..., :4] = False  # sequence 1 is left-padded by 4
    mask[1, :, :4, 0] = True  # (its padding rows see one key, as HF masks do)
    seen = []
    for m in (None, mask):
        kw = dict(scale=D ** -0.5, q_pos=torch.arange(T), mask=m, plan=plan, chunk=chunk)
        ref = eager.attend(q, k, v, on_chunk=lambda chunk: seen.append(chunk.probs), **kw)  # pattern path
        fast = eager.attend(q, k, v, **kw)
        assert torch.allclose(fast, ref, atol=1e-5)
    sinks, _ = eager._act_sinks(q, k.expand(B, H, T, D), AttentionCall.plain(D ** -0.5, T, T), plan, chunk)
    assert all(int(s.sum()) > 0 for s in sinks.values())  # the test exercises real sinks


def test_sdpa_for_unedited_heads_matches_the_all_eager_engine(tiny_llama, monkeypatch):
    """Engine change: unobserved layers run SDPA and only edited heads the eager engine (same results)."""
    from probe import Temperature, ZeroAblate, runtime

    spec = InterventionSpec([SinkCalibration(heads=["L1H1", "L0H2"], beta=0.3), ZeroAblate(heads=["L1H3"]),
                             Temperature(heads=["L1H0"], temperature=2.0)])
    ids = tiny_llama.encode("the cat sat on the mat, the end.")
    with torch.no_grad(), intervene(tiny_llama, spec):
        fast = tiny_llama.hf(ids).logits
        fast_gen = tiny_llama.hf.generate(ids, max_new_tokens=5, do_sample=False)
        monkeypatch.setattr(runtime.Engine, "_unobserved", lambda *a: False)
        slow = tiny_llama.hf(ids).logits
        slow_gen = tiny_llama.hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.equal(fast_gen, slow_gen)


def test_profile_without_any_sink_still_gives_a_frame(tiny_llama):
    prof = profile_sinks(tiny_llama, ["the cat sat on the mat."], tau=1.01)  # no column mean can exceed 1
    df = prof.to_frame()
    assert len(prof.sinks) == 0 and len(df) > 0
    assert set(df.metric.str.split(":").str[0]) == {"mass"}
