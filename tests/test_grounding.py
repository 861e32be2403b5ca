"""Lookback Lens: ratio, span averaging, detector, JSON round trip, mitigation plumbing, bad inputs."""
import numpy as np
import pytest
import torch

from analyses.grounding import (Detector, GroundingResult, boost_heads, boost_spec, fit, guided_generate, label,
                                ratio, ratios_from_stats, regions, span_feature, token_scores, token_view_html)
from analyses.grounding.data import build_items, split_of
from analyses.grounding.detector import auroc, bootstrap_ci, evaluate
from analyses.units import UnitStore
from probe.errors import CorruptFileError, InputError
from probe.heads import HeadId
from probe.interventions import InterventionSpec, SpanKnockout
from probe.streaming import generate_with_stats


def test_ratio_hand_values():
    # A_ctx = 0.6/3 = 0.2, A_new = 0.4/4 = 0.1 -> 2/3 (means, not sums: sums would give 0.6)
    assert float(ratio(torch.tensor(0.6), torch.tensor(0.4), 3, 4)) == pytest.approx(2 / 3)
    assert float(ratio(torch.tensor(1.0), torch.tensor(0.0), 5, 2)) == 1.0
    assert float(ratio(torch.tensor(0.0), torch.tensor(1.0), 5, 2)) == 0.0
    # paper reading, first row: no new tokens visible
    assert float(ratio(torch.tensor(0.7), torch.tensor(0.0), 5, 0)) == 1.0
    assert torch.isnan(ratio(torch.tensor(0.7), torch.tensor(0.0), 5, 0, empty_new="nan"))


@pytest.mark.parametrize("knock, expected", [("new", 1.0), ("ctx", 0.0)])
def test_ratio_on_a_head_that_only_sees_one_region(tiny_llama, knock, expected):
    """Knock out one region for head L1H2: its lookback ratio is exactly 1 (sees only context) or 0."""
    ids = tiny_llama.encode("the context here. answer:")
    T = ids.shape[1]
    reg = regions(T, 0, T - 3, "code")
    span = (reg.new_start, T + 50) if knock == "new" else (0, reg.ctx_stop)
    spec = InterventionSpec([SpanKnockout(heads=("L1H2",), spans=(span,))])
    gen = generate_with_stats(tiny_llama, ids, max_new_tokens=4, groups=reg.groups(), stats_in_prefill="last",
                              prefill_spec=spec, decode_spec=spec)
    lr = ratios_from_stats(gen.stats, reg)           # [rows, L, H]
    assert lr.shape[1:] == (2, 4) and lr.shape[0] >= 1
    assert torch.allclose(lr[:, 1, 2], torch.full_like(lr[:, 1, 2], expected), atol=1e-5)
    other = lr[:, 0, 0]
    assert bool(((other > 0) & (other < 1)).all())   # an untouched head mixes both regions


def test_span_feature_averages_rows_and_skips_nan():
    lr = torch.tensor([[[0.2, 1.0]], [[0.4, float("nan")]], [[0.9, 0.0]]])  # [rows=3, L=1, H=2]
    assert span_feature(lr).tolist() == pytest.approx([0.5, 0.5])
    assert span_feature(lr, 0, 2).tolist() == pytest.approx([0.3, 1.0])


def _synthetic(n, d=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.uniform(0.2, 0.8, (n, d))
    X[:, 5] += 0.3 * (2 * y - 1)             # one informative head (L1H2 on a 4x3 grid)
    return X, y


def test_detector_separates_synthetic_features():
    (Xtr, ytr), (Xte, yte) = _synthetic(200), _synthetic(100, seed=1)
    det, s = evaluate(Xtr, ytr, Xte, yte, 4, 3, n_boot=200, n_perm=10)
    assert s["auroc"] > 0.95 and s["auroc_ci"][0] > 0.85
    assert s["null_q95"] < 0.8 and s["perm_p"] < 0.2
    w = det.head_weights()
    assert w.shape == (4, 3) and np.argmax(w) == 5 and w[1, 2] > 0


def test_detector_json_round_trip_reproduces_scores(tmp_path):
    X, y = _synthetic(80)
    det = fit(X, y, 4, 3, meta={"note": "x"})
    path = det.save(tmp_path / "det.json")
    assert "coef" in path.read_text()                 # plain JSON, no pickle
    again = Detector.load(path)
    assert np.array_equal(again.score(X), det.score(X)) and again.meta == {"note": "x"}
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(CorruptFileError):
        Detector.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="expects 12"):
        det.score(np.zeros((2, 5)))


def test_bad_inputs():
    with pytest.raises(InputError, match="empty context"):
        regions(10, 4, 4)
    with pytest.raises(InputError, match="no generated tokens"):
        span_feature(torch.zeros(0, 2, 3))
    with pytest.raises(InputError, match="one class"):
        fit(np.zeros((4, 6)), np.ones(4), 2, 3)
    with pytest.raises(InputError, match="reading"):
        regions(10, 0, 4, "other")


def test_labels_and_split():
    assert label(" Lyon.", "Lyon", "Paris") == 1 and label("Paris", "Lyon", "Paris") == 0
    assert label("Lyon, not Paris", "Lyon", "Paris") is None and label(" 8 legs", "eight", "six") == 1
    items = build_items()
    splits = {}
    for it in items:
        splits.setdefault(it.fact_id, set()).add(split_of(it))
    assert all(len(s) == 1 for s in splits.values())          # a fact never crosses the split
    assert {"train", "heldout"} == set().union(*splits.values())
    assert all(it.passage_value in it.prompt and it.prompt[it.context_end:].startswith("\n") for it in items)


def test_guided_generate_picks_the_best_scoring_chunk(tiny_llama, monkeypatch):
    from analyses.grounding import mitigate

    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    rng = np.random.default_rng(0)
    det = Detector(rng.normal(size=L * H) * 20, 0.0, np.full(L * H, 0.5), np.ones(L * H), L, H)
    real, sizes = mitigate._candidate, []
    monkeypatch.setattr(mitigate, "_candidate", lambda *a: sizes.append(len((c := real(*a))[0])) or c)
    scored = []
    monkeypatch.setattr(Detector, "score", lambda self, X: scored.append(Detector.decision(self, X)) or
                        1.0 / (1.0 + np.exp(-Detector.decision(self, X))))
    out = guided_generate(tiny_llama, "some context text. q:", det, max_new_tokens=6, chunk=3, n_candidates=3,
                          stop_at_newline=False)
    assert 1 <= len(out.new_ids) <= 6 and out.row_lr.shape == (len(out.new_ids), L, H)
    assert np.all((out.row_lr >= 0) & (out.row_lr <= 1))
    first = [1.0 / (1.0 + np.exp(-float(d[0]))) for d in scored[:3]]          # the three candidates of step 1
    assert all(n > 0 for n in sizes[:3]) and len(set(np.round(first, 9))) > 1   # real, different candidates
    assert out.chunk_scores[0] == pytest.approx(max(first), rel=1e-9)          # the best one was kept
    # the kept chunk's score is the detector's score of its rows' mean
    rows = out.row_lr[:min(3, len(out.new_ids))].mean(0).reshape(1, -1)
    assert out.chunk_scores[0] == pytest.approx(float(1.0 / (1.0 + np.exp(-det.decision(rows)[0]))), rel=1e-5)
    monkeypatch.undo()
    scores = token_scores(det, out.row_lr)
    assert "P(grounded)" in token_view_html([str(t) for t in out.new_ids], scores)
    bad = Detector(np.ones(6), 0.0, np.zeros(6), np.ones(6), 2, 3)
    with pytest.raises(InputError, match="detector is for"):
        guided_generate(tiny_llama, "some context. q:", bad)


def test_boost_heads_and_result_round_trip(tmp_path):
    L, H = 5, 3
    coef = np.arange(L * H, dtype=float)
    det = Detector(coef, 0.0, np.zeros(L * H), np.ones(L * H), L, H)
    assert all(h.layer >= 2 for h in boost_heads(det)) and len(boost_heads(det)) == 9
    top = boost_heads(det, 2)
    assert [str(h) for h in top] == ["L4H2", "L4H1"]
    rnd = boost_heads(det, 2, "random")
    assert len(rnd) == 2 and all(h.layer >= 2 for h in rnd)
    with pytest.raises(InputError):
        boost_spec([], (0, 3))
    with pytest.raises(InputError, match="cannot pick"):
        boost_heads(det, 10)
    with pytest.raises(InputError, match="at least 3 layers"):
        boost_heads(Detector(np.ones(6), 0.0, np.zeros(6), np.ones(6), 2, 3))
    import pandas as pd
    res = GroundingResult("m", {"auroc": 0.9, "auroc_ci": [0.8, 0.95], "baseline_auroc": 0.6},
                          det.head_weights(), pd.DataFrame([{"condition": "greedy", "n": 3, "grounded_rate": 0.5,
                                                             "contradicted_rate": 0.2, "heads": "[]"}]))
    again = GroundingResult.load(res.save(tmp_path / "r"))
    assert np.array_equal(again.head_weights, res.head_weights) and again.stats == res.stats
    f = again.to_frame()
    assert set(f.metric) >= {"coef", "rank", "auroc", "grounded_rate:greedy"}
    assert f[(f.metric == "rank") & (f.layer == 4) & (f["head"] == 2)]["value"].item() == 1
    assert again.plot().data[0].z.shape == (L, H)


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = y + rng.normal(0, 0.8, 60)
    lo, hi = bootstrap_ci(y, s, n=300)
    assert lo <= auroc(y, s) <= hi and hi - lo > 0.01


@pytest.mark.slow
def test_embedded_model_answer_has_ratios(smol):
    from analyses.grounding.data import answer_item

    item = build_items()[0]
    row = answer_item(smol, item, max_new_tokens=3)
    lr = np.asarray(row["row_lr"]).reshape(row["n_new"], smol.n_layers, smol.n_heads)
    assert row["n_new"] >= 1 and np.all((lr >= 0) & (lr <= 1)) and 0.05 < lr.mean() < 0.95


def test_dataset_resumes_finished_shards(tiny_llama, tmp_path, monkeypatch):
    from analyses.grounding import GROUNDING, GroundingConfig, run as stages
    from analyses.runner import run_stage

    cfg, items = GroundingConfig(limit=3, shard=2, max_new_tokens=2), GROUNDING.stage("items")
    df = run_stage(GROUNDING, items, tiny_llama, cfg, None, UnitStore(tmp_path))["df"]
    assert len(df) == 3 and len(list((tmp_path / "units" / "items").glob("shard-*"))) == 2
    assert set(df["split"]) <= {"train", "heldout"} and all(len(r) == n * 8 for r, n in zip(df.row_lr, df.n_new))

    def boom(*a, **k):
        raise AssertionError("a finished shard was recomputed")

    monkeypatch.setattr(stages, "answer_item", boom)
    again = run_stage(GROUNDING, items, tiny_llama, cfg, None, UnitStore(tmp_path))["df"]
    assert again["answer"].tolist() == df["answer"].tolist()


def test_cli_generate_writes_token_view(tiny_llama, tmp_path, capsys):
    from analyses.cli import main

    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    made = {"model_id": tiny_llama.model_id, "weights_hash": tiny_llama.weights_hash}   # as `scan grounding` records
    Detector(np.ones(L * H), 0.0, np.zeros(L * H), np.ones(L * H), L, H, made).save(tmp_path / "d.json")
    rc = main(["generate", "--model", "tiny-llama", "--guided", str(tmp_path / "d.json"),
               "--max-new-tokens", "4", "--html", str(tmp_path / "v.html"), "context.\nq:"])
    assert rc == 0 and "P(grounded)" in (tmp_path / "v.html").read_text()
    assert "chunk scores" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny-llama", "--guided", str(tmp_path / "v.html"), "x"]) == 2
    assert main(["generate", "--model", "tiny-llama", "--html", str(tmp_path / "w.html"), "x"]) == 2


def test_grouped_auroc_ignores_what_the_group_explains():
    from analyses.grounding.detector import grouped_auroc

    y, g = np.array([1, 0, 1, 0]), np.array(["a", "a", "b", "b"])
    assert grouped_auroc(y, [0.9, 0.1, 0.2, 0.3], g) == 0.5          # right in a, wrong in b
    assert grouped_auroc(y, [0.9, 0.8, 0.3, 0.2], g) == 1.0
    y8, g8, s8 = [1, 1, 1, 0, 1, 0, 0, 0], list("aaaabbbb"), [1, 1, 1, 1, 0, 0, 0, 0]   # group-only score
    assert auroc(y8, s8) == 0.75 and grouped_auroc(y8, s8, g8) == 0.5
    with pytest.raises(InputError, match="both classes"):
        grouped_auroc([1, 0], [0.1, 0.2], ["a", "b"])


def test_center_by_group_removes_group_means_without_labels():
    from analyses.grounding.detector import center_by_group

    X = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 4.0], [12.0, 6.0]])
    C, means = center_by_group(X, np.array([0, 0, 1, 1]))
    assert C.mean(0).tolist() == pytest.approx(X.mean(0).tolist())
    assert C[:2].mean(0).tolist() == pytest.approx(C[2:].mean(0).tolist())   # group offset gone
    new, _ = center_by_group(np.array([[2.0, 1.0], [5.0, 5.0]]), np.array([0, 7]), means)
    assert new[0].tolist() == pytest.approx([2.0 + 4.5, 1.0 + 2.0]) and new[1].tolist() == [5.0, 5.0]


def _confounded_frame(n=240, seed=0, signal=0.0):
    """Two templates with different grounded rates and shifted features; ``signal`` = within-template cue."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    t = rng.integers(0, 2, n)
    y = (rng.random(n) < np.where(t == 0, 0.85, 0.15)).astype(int)
    X = rng.normal(0, 1, (n, 4)) + 2.0 * t[:, None]
    X[:, 1] += signal * (2 * y - 1)
    return pd.DataFrame({"split": np.where(np.arange(n) % 3 == 0, "heldout", "train"), "label": y.astype(float),
                         "n_new": 1, "template_id": t, "row_lr": list(X)})


@pytest.mark.parametrize("signal", [0.0, 1.5])
def test_fit_detectors_separates_template_from_within_template_signal(signal):
    from analyses.grounding.detector import fit_detectors

    det, s = fit_detectors(_confounded_frame(signal=signal), 2, 2, n_perm=10, n_boot=50)
    assert s["auroc"] > 0.75                     # pooled: the template alone is enough
    if signal == 0.0:
        assert 0.3 < s["w_auroc"] < 0.7 and s["w_perm_p"] > 0.05 and s["centred_w_auroc"] < 0.7
    else:
        assert s["w_auroc"] > 0.8 and s["centred_w_auroc"] > 0.8 and s["centred_w_perm_p"] < 0.1
        assert np.argmax(np.abs(det.head_weights())) == 1
    with pytest.raises(InputError, match="center"):
        fit_detectors(_confounded_frame(), 2, 2, center="x")


def test_paired_diff():
    from analyses.grounding.detector import paired_diff

    d, lo, hi = paired_diff([1] * 30 + [0] * 10, [0] * 40)
    assert d == 0.75 and lo < 0.75 < hi and lo > 0.5
    assert paired_diff([1, 0], [1, 0]) == (0.0, 0.0, 0.0)
    with pytest.raises(InputError):
        paired_diff([], [])


def _mitigation_state(model, items, greedy, det):
    """The state the mitigation stage reads: these items held out, answered greedily as ``greedy`` says."""
    import pandas as pd

    df = pd.DataFrame({"item_id": [it.item_id for it in items], "split": "heldout", "answer": greedy,
                       "label": np.nan, "n_new": 1, "row_lr": [[0.5] * model.n_layers * model.n_heads] * len(items)})
    return {"df": df, "detector": det, "stats": {"n_heldout": len(items)}}


def test_mitigation_rates_and_resume(tiny_llama, tmp_path, monkeypatch):
    from analyses.grounding import GROUNDING, GroundingConfig, mitigate, run as stages
    from analyses.runner import run_stage

    items = build_items()[:2]
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    det = Detector(np.ones(L * H), 0.0, np.zeros(L * H), np.ones(L * H), L, H)
    # tiny-llama has no layers 2..L-1: boost layer-1 heads instead (the choice of heads is tested above)
    monkeypatch.setattr(mitigate, "boost_heads", lambda d, k=None, how="top", seed=0:
                        [HeadId(1, h) for h in ((0, 1, 2, 3) if k is None else (0, 1) if how == "top" else (2, 3))])
    monkeypatch.setattr(stages, "mitigation_items", lambda cfg, df: items)
    state = _mitigation_state(tiny_llama, items, [f" {items[0].passage_value}", f" {items[1].true_value}"], det)
    cfg = GroundingConfig(k=2, max_new_tokens=2, block=1, n_mitigate=2, boost="context")
    stage = GROUNDING.stage("mitigation")
    m = run_stage(GROUNDING, stage, tiny_llama, cfg, state, UnitStore(tmp_path)).mitigation
    g = m.set_index("condition")
    assert len(m) == 6 and set(m["n"]) == {2} and len(list((tmp_path / "units" / "mitigation").glob("*"))) == 12
    assert g.loc["greedy", "grounded_rate"] == 0.5 and g.loc["greedy", "contradicted_rate"] == 0.5
    assert g.loc["guided", "control"] == "sampled" and g.loc["boost_top2", "control"] == "boost_random2"
    assert g.loc["greedy", "d_greedy"] == 0.0 and np.isnan(g.loc["greedy", "d_control"])
    from analyses.grounding.result import mitigation_stats

    st = mitigation_stats(m)                       # every headline with its n and interval (issue 18)
    assert st["mitigation_greedy"].n == 2 and st["mitigation_greedy"].ci[0] < 0.5 < st["mitigation_greedy"].ci[1]
    assert st["mitigation_guided_vs_sampled"].ci == (g.loc["guided", "d_control_lo"], g.loc["guided", "d_control_hi"])
    assert "mitigation_greedy_vs_greedy" not in st and "McNemar" in st["mitigation_boost_top2_vs_greedy"].label

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(stages, "answer", boom)
    again = run_stage(GROUNDING, stage, tiny_llama, cfg, state, UnitStore(tmp_path)).mitigation
    assert again["grounded_rate"].tolist() == m["grounded_rate"].tolist()
    other = Detector(-np.ones(L * H), 0.0, np.zeros(L * H), np.ones(L * H), L, H)
    with pytest.raises(AssertionError, match="recomputed"):   # a new detector invalidates saved guided answers
        run_stage(GROUNDING, stage, tiny_llama, cfg, state | {"detector": other}, UnitStore(tmp_path))


def _check_baselines(state, folder):
    """The honest baselines (issue 18) reach the result: listed before the detector in its summary, tabled on its page."""
    from analyses.grounding.baselines import ORDER
    from analyses.layout import Section, Table

    base = state["stats"]["baselines"]
    assert list(base) == list(ORDER) and base["template_only"]["estimate"] > 0.7    # the template predicts the label
    res = GroundingResult("fake", state["stats"], state["detector"].head_weights(), detector=state["detector"])
    keys = list(res.summary())
    assert keys.index("baseline_template_only") < keys.index("auroc")
    assert res.summary()["baseline_template_only"].n == base["template_only"]["n"]

    def tables(items):
        return [t for i in items for t in (tables(i.items) if isinstance(i, Section) else [i] if isinstance(i, Table)
                                           else [])]

    table = next(t for t in tables(res.sections()) if t.name == "baselines")
    assert table.frame["scorer"].tolist()[:2] == ["template_only", "within_template_detector"]
    assert GroundingResult.load(res.save(folder)).stats["baselines"]["template_only"] == base["template_only"]


def test_detector_stage_reloads_instead_of_refitting(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from analyses.grounding import GROUNDING, GroundingConfig, run as stages
    from analyses.runner import run_stage

    fake = SimpleNamespace(n_layers=2, n_heads=2, weights_hash="h", model_id="fake")
    df = _confounded_frame(signal=1.5)
    df["item_id"], df["answer"] = [f"i{i}" for i in range(len(df))], "x"
    cfg, stage = GroundingConfig(n_perm=2), GROUNDING.stage("detector")
    real = stages.fit_detectors
    monkeypatch.setattr(stages, "fit_detectors", lambda *a, **k: real(*a, **{**k, "n_boot": 20}))
    first = run_stage(GROUNDING, stage, fake, cfg, {"df": df}, UnitStore(tmp_path))
    det, s = first["detector"], first["stats"]
    assert s["n_items"] == len(df) and det.meta["model_id"] == "fake"
    _check_baselines(first, tmp_path / "result")

    def boom(*a, **k):
        raise AssertionError("refit")

    monkeypatch.setattr(stages, "fit_detectors", boom)
    again = run_stage(GROUNDING, stage, fake, cfg, {"df": df}, UnitStore(tmp_path))
    assert np.array_equal(again["detector"].coef, det.coef) and again["stats"]["auroc"] == s["auroc"]
    df.loc[0, "answer"] = "changed"
    with pytest.raises(AssertionError, match="refit"):
        run_stage(GROUNDING, stage, fake, cfg, {"df": df}, UnitStore(tmp_path))


def test_generate_command_options_are_checked_before_loading(tmp_path, capsys):
    from analyses.cli import main

    assert main(["generate", "--model", "tiny-llama", "--max-new-tokens", "0", "x"]) == 2
    assert main(["generate", "--model", "tiny-llama", "--chat", "--guided", str(tmp_path / "d.json"), "x"]) == 2
    assert "--chat applies to greedy" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-llama", "--max-new-tokens", "2", "abc"]) == 0


def test_guided_generate_never_keeps_an_empty_chunk_over_a_real_one(tiny_llama, monkeypatch):
    """An empty candidate is scored on the prompt's row alone; it must not beat a chunk with tokens."""
    from analyses.grounding import mitigate

    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    det = Detector(np.ones(L * H), 0.0, np.zeros(L * H), np.ones(L * H), L, H)
    calls = iter(range(100))

    def fake_candidate(model, reg, past, logits, n, stop, sample):
        i = next(calls)
        toks = [] if i % 2 == 0 else [65]  # empty first, then one token (same features: ties)
        return toks, torch.zeros(len(toks), L, H), past, logits

    monkeypatch.setattr(mitigate, "_candidate", fake_candidate)
    out = guided_generate(tiny_llama, "some context text. q:", det, max_new_tokens=4, chunk=4, n_candidates=2)
    assert out.new_ids == [65]
