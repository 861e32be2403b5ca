"""Tests for analyses.similarity (EchoAtt): measures, windowed accumulation, echo, plan, files, CLI."""
import math

import numpy as np
import pytest
import torch

from analyses import run
from analyses.similarity import (SIMILARITY, Accumulator, SimilarityConfig, SimilarityResult, accumulate_prompt,
                                 greedy_plan, js_rows, match_heads, tokenize)
from analyses.similarity.echo import echo_edits, mean_loss
from probe import InputError, InterventionSpec, capture, families, intervene


# ----------------------------------------------------------------------------- hand-checkable measures

def test_js_rows_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.75, 0.25]])
    js = js_rows(p, q)
    assert js[0] == pytest.approx(1.0, abs=1e-6)  # disjoint supports: 1 bit
    assert js[1] == pytest.approx(0.0, abs=1e-7)
    m = np.array([0.5, 0.5])
    kl = lambda a: float(np.sum(a * np.log2(a / m)))  # noqa: E731
    assert js[2] == pytest.approx(0.5 * kl(np.array([0.25, 0.75])) + 0.5 * kl(np.array([0.75, 0.25])), rel=1e-5)


def _random_causal(L, H, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(L, H, T, T, generator=g).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return s.softmax(-1)


def test_identical_patterns_give_cosine_one_and_zero_divergence():
    p = _random_causal(1, 3, 6)
    probs = torch.cat([p, p, _random_causal(1, 3, 6, seed=1)])  # layers 0 and 1 identical, layer 2 not
    acc = Accumulator(3, 3)
    acc.add_window(probs)
    acc.end_prompt()
    m = acc.finish()
    assert m["layer_cos"][0, 1] == pytest.approx(1.0, abs=1e-9)
    assert m["layer_js"][0, 1] == pytest.approx(0.0, abs=1e-9)
    assert np.allclose(np.diag(m["head_js"][0]), 0.0, atol=1e-9)   # head h of L0 vs head h of L1
    assert np.allclose(np.diag(m["head_cos"][:3, 3:6]), 1.0, atol=1e-9)
    assert m["layer_cos"][0, 2] < 1 - 1e-3 and m["layer_js"][0, 2] > 1e-3


def _texts(tmp_path, name, *texts):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n\n".join(texts))
    return str(path)


def test_symmetry_unit_diagonal_and_ranges(tiny_llama, tmp_path):
    cfg = SimilarityConfig(prompts=_texts(tmp_path, "p", "the cat sat on the mat", "numbers: 1 2 3 4 5 6"),
                           heldout=_texts(tmp_path, "h", "some held out words"), window=4, head_js="all",
                           variants=("same",), max_trials=1, n_clusters=3)
    r = run(SIMILARITY, tiny_llama, cfg, progress=False)
    for m in (r.layer_cos, r.head_cos, r.layer_js, r.head_js):
        assert np.allclose(m, m.T, atol=1e-9)
    assert np.allclose(np.diag(r.layer_cos), 1.0) and np.allclose(np.diag(r.head_cos), 1.0)
    assert np.allclose(np.diag(r.layer_js), 0.0) and np.allclose(np.diag(r.head_js), 0.0)
    assert (r.layer_js >= 0).all() and (r.layer_js <= 1).all() and (r.head_cos <= 1 + 1e-9).all()
    assert r.families.shape == (8,) and len(set(r.families.tolist())) == 3


# ----------------------------------------------------------------------------- windowed == direct

def _direct(patterns):
    """Reference from full patterns [L, H, T, T] (numpy, written independently of the accumulator)."""
    P = patterns.double().numpy()
    L, H, T, _ = P.shape
    A = P.mean(1).reshape(L, -1)
    cos = lambda X: (X @ X.T) / np.outer(np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=1))  # noqa: E731

    def js(p, q):
        m = 0.5 * (p + q)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(p > 0, p * np.log2(p / m), 0) + np.where(q > 0, q * np.log2(q / m), 0)
        return 0.5 * t.sum(-1).mean()

    Am = P.mean(1)
    ljs = np.array([[js(Am[a], Am[b]) for b in range(L)] for a in range(L)])
    hjs = np.array([[[js(P[l, a], P[l + 1, b]) for b in range(H)] for a in range(H)] for l in range(L - 1)])
    return cos(A), cos(P.reshape(L * H, -1)), ljs, hjs


@pytest.mark.parametrize("window", [1, 5, 64])
def test_windowed_accumulation_equals_direct_from_captured_patterns(tiny_llama, window):
    text = "windows of rows!"
    rec = capture(tiny_llama, text)
    acc = Accumulator(tiny_llama.n_layers, tiny_llama.n_heads)
    accumulate_prompt(tiny_llama, tiny_llama.encode(text), acc, window)
    m = acc.finish()
    lc, hc, ljs, hjs = _direct(rec.patterns)
    np.testing.assert_allclose(m["layer_cos"], lc, atol=1e-5)
    np.testing.assert_allclose(m["head_cos"], hc, atol=1e-5)
    np.testing.assert_allclose(m["layer_js"], ljs, atol=1e-5)
    np.testing.assert_allclose(m["head_js"], hjs, atol=1e-5)


def test_one_forward_and_blocks_of_window_rows(tiny_llama, monkeypatch):
    """The prompt runs once; each block holds at most L x H x window x T (its keys end at its last row)."""
    import analyses.similarity.measure as measure

    shapes, forwards = [], []
    real = measure.Accumulator.add_window
    monkeypatch.setattr(measure.Accumulator, "add_window", lambda self, p: (shapes.append(tuple(p.shape)),
                                                                              real(self, p))[1])
    hook = tiny_llama.hf.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        ids = tiny_llama.encode("ten tokens")
        measure.accumulate_prompt(tiny_llama, ids, Accumulator(2, 4), window=4)
    finally:
        hook.remove()
    assert ids.shape[1] == 10 and len(forwards) == 1
    assert shapes == [(2, 4, 4, 4), (2, 4, 4, 8), (2, 4, 2, 10)]  # L x H x window x (keys up to the block's last row)
    assert all(s[2] <= 4 and s[3] <= 10 for s in shapes)


# ----------------------------------------------------------------------------- echo == hand substitution

def _hand_echo_logits(model, ids, perm):
    """Layer 1 recomputed by hand: head perm[h] of layer 1 uses layer 0 head h's pattern with its own values."""
    P0 = capture(model, ids, layers=[0]).patterns[0]          # (head, T, T)
    attn = families.attention(model, 1)
    seen = {}
    h_v = attn.v_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("v", o.detach()))
    with torch.no_grad():
        model.hf(ids)
    h_v.remove()
    H, D, T = model.n_heads, model.d_head, ids.shape[1]
    v = seen["v"][0].reshape(T, model.n_kv_heads, D)          # (T, kv, D)
    z = torch.empty(T, H, D)
    for h in range(H):
        tgt = int(perm[h])
        z[:, tgt] = P0[h] @ v[:, tgt // (H // model.n_kv_heads)]
    out = families.attention_out(model, 1)(z.reshape(1, T, H * D))
    hook = attn.register_forward_hook(lambda mod, i, o: (out,) + tuple(o[1:]))
    try:
        with torch.no_grad():
            return model.hf(ids).logits
    finally:
        hook.remove()


@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [2, 0, 3, 1]])
def test_echo_intervention_equals_hand_made_substitution(tiny_llama, perm):
    ids = tiny_llama.encode("echo, echo, echo")
    with torch.no_grad(), intervene(tiny_llama, InterventionSpec(echo_edits(0, 1, perm))):
        echoed = tiny_llama.hf(ids).logits
    with torch.no_grad():
        clean = tiny_llama.hf(ids).logits
    hand = _hand_echo_logits(tiny_llama, ids, perm)
    torch.testing.assert_close(echoed, hand, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(echoed, clean, atol=1e-4)  # the echo does change something


def test_mean_loss_is_cross_entropy(tiny_llama):
    ids = tiny_llama.encode("loss check")
    with torch.no_grad():
        logp = tiny_llama.hf(ids).logits[0, :-1].log_softmax(-1)
    want = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
    assert mean_loss(tiny_llama, [ids]) == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- matching and plan

def test_match_heads_recovers_a_permutation():
    rng = np.random.default_rng(0)
    perm = rng.permutation(5)
    sim = np.full((10, 10), 0.1)
    sim[np.arange(5), 5 + perm] = 0.9
    np.testing.assert_array_equal(match_heads(sim, 2, 5, 0, 1), perm)


def test_greedy_plan_merges_most_similar_first_and_respects_budget():
    cos = np.array([[1, .9, .2, .1], [.9, 1, .5, .3], [.2, .5, 1, .8], [.1, .3, .8, 1.]])
    cost = {(0, 1): .05, (2, 3): .04}  # every other echo costs 1.0

    def measure(blocks):
        return sum(cost.get((b[0], t), 1.0) for b in blocks for t in b[1:])

    blocks, total, log = greedy_plan(cos, measure, budget=0.1, max_trials=10)
    assert blocks == [[0, 1], [2, 3]] and total == pytest.approx(0.09)
    assert log[0]["merge"] == [0, 1, 1] and all(not t["accepted"] for t in log[2:])


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="one token"):
        tokenize(tiny_llama, ["ok text", "a"], 64, "prompt")
    with pytest.raises(InputError, match="non-empty list"):
        tokenize(tiny_llama, "a bare string", 64, "prompt")
    with pytest.raises(InputError, match="no text"):
        run(SIMILARITY, tiny_llama, SimilarityConfig(prompts=_texts(tmp_path, "p", "fine"),
                                                     heldout=_texts(tmp_path, "h", "  ")), progress=False)
    acc = Accumulator(2, 4)
    with pytest.raises(InputError, match="one model"):  # a window from another model's prompt set
        acc.add_window(_random_causal(3, 4, 5))
    with pytest.raises(InputError, match="two tokens"):
        accumulate_prompt(tiny_llama, tiny_llama.encode("a"), acc, 4)
    with pytest.raises(InputError, match="no prompt"):
        acc.finish()
    with pytest.raises(InputError, match="variant"):
        SimilarityConfig(variants=("shuffled",))


# ----------------------------------------------------------------------------- result, files, CLI

def test_cli_writes_results_resumes_and_loads(tmp_path, capsys):
    from analyses.cli import main

    argv = ["scan", "similarity", "--model", "tiny-llama", "--out", str(tmp_path), "--n-prompts", "2",
            "--n-heldout", "2", "--max-tokens", "24", "--window", "8", "--max-trials", "2"]
    assert main(argv) == 0
    units = sorted(p.name for p in (tmp_path / "units").rglob("*.*"))
    assert any(u.startswith("prompt-") for u in units) and any("baseline" in u for u in units)
    assert any(u.startswith("trial-") for u in units)          # every measured plan trial is a unit too
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "units").rglob("*.*")}
    assert main(argv) == 0  # resumes: every unit reused, none rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "units").rglob("*.*")} == stamps
    r = SimilarityResult.load(tmp_path)
    assert all((tmp_path / "figures" / f"{k}.html").stat().st_size > 1000 for k in ("layers", "echo"))
    df = r.to_frame()
    assert {"scope", "layer", "head", "layer2", "head2", "metric", "value"} <= set(df.columns)
    assert len(df[(df.scope == "echo") & (df.metric == "loss_increase_matched")]) == 1
    for kind in ("layers", "heads", "clusters", "echo"):
        assert r.plot(kind).data
    s = r.summary()
    assert math.isfinite(s["plan_cost"].value) and r.baseline_loss > 0 and "plan: layers shared" in capsys.readouterr().out


@pytest.mark.slow
def test_smol_windowed_similarity_matches_eager_patterns(smol, reference_patterns):
    ids = smol.encode("The quick brown fox jumps over the lazy dog near the river bank.")
    acc = Accumulator(smol.n_layers, smol.n_heads)
    accumulate_prompt(smol, ids, acc, window=5)
    m = acc.finish()
    lc, hc, ljs, _ = _direct(reference_patterns(smol, ids))
    np.testing.assert_allclose(m["layer_cos"], lc, atol=1e-4)
    np.testing.assert_allclose(m["head_cos"], hc, atol=1e-4)
    np.testing.assert_allclose(m["layer_js"], ljs, atol=1e-4)


# ----------------------------------------------------------------------------- intervals (issue 18, Deliver 5)

def test_loss_intervals_pool_like_the_estimate_and_pair_baseline_and_echo():
    from analyses.similarity.intervals import difference_ci, increase_ci

    base = np.array([[10.0, 10], [30.0, 20], [8.0, 4]])             # per text: loss sum, tokens
    echo = base + np.array([[1.0, 0], [2.0, 0], [0.4, 0]])          # +0.1 nats/token on every text
    i = increase_ci(echo, base)
    assert i.estimate == pytest.approx(3.4 / 34) and i.n == 3
    assert i.lo == pytest.approx(0.1) and i.hi == pytest.approx(0.1)   # the same increase on every text: no spread
    pairs = np.stack([echo, base + np.array([[3.0, 0], [0.0, 0], [0.0, 0]])])   # 2 pairs; the 2nd varies by text
    j = increase_ci(pairs, base)
    assert j.estimate == pytest.approx((3.4 / 34 + 3.0 / 34) / 2) and j.lo < j.estimate < j.hi
    d = difference_ci(echo, base)                                    # paired: equals the increase
    assert (d.estimate, d.lo, d.hi) == pytest.approx((i.estimate, i.lo, i.hi))


def test_spearman_interval_is_over_pairs_and_a_perfect_rank_order_stays_one():
    from analyses.similarity.intervals import adjacent_cis, spearman_ci

    x = np.arange(12.0)
    s = spearman_ci(x, -x ** 3)
    assert (s.estimate, s.lo, s.hi) == pytest.approx((-1.0, -1.0, -1.0)) and s.n == 12
    a = adjacent_cis(np.array([[0.8, 0.9, 0.9, 0.95], [0.9, 0.9, 0.92, 0.97]]))
    assert a["first"].estimate == pytest.approx(0.85) and a["first"].n == 2 and a["first"].lo >= 0.8
    assert a["inner"].estimate == pytest.approx((0.9 + 0.91) / 2) and a["last"].hi <= 0.97


def test_a_saved_result_keeps_what_its_intervals_resample(tiny_llama, tmp_path):
    cfg = SimilarityConfig(prompts=_texts(tmp_path, "p", "the cat sat on the mat", "numbers: 1 2 3 4 5 6",
                                          "a third prompt of words"),
                           heldout=_texts(tmp_path, "h", "some held out words", "and two more held out lines"),
                           window=4, variants=("same", "matched"), max_trials=2)
    r = run(SIMILARITY, tiny_llama, cfg, progress=False)
    assert r.prompt_adjacent.shape == (3, tiny_llama.n_layers - 1) and r.base_texts.shape == (2, 2)
    assert np.allclose(r.prompt_adjacent.mean(0), r.adjacent("layer"))          # each prompt's own cosines
    assert r.baseline_loss == pytest.approx(r.base_texts[:, 0].sum() / r.base_texts[:, 1].sum())
    assert np.allclose(r.echo["same"], r.echo_texts["same"][..., 0].sum(-1) / r.echo_texts["same"][..., 1].sum(-1)
                       - r.baseline_loss)
    s = r.summary()
    assert s["first_pair_cos"].n == 3 and s["first_pair_cos"].ci[0] <= s["first_pair_cos"].value <= s["first_pair_cos"].ci[1]
    assert s["echo_matched_minus_same"].n == 2 and s["plan_cost"].ci is not None
    back = SimilarityResult.load(r.save(tmp_path / "out"))
    assert {k: repr((v.value, v.ci, v.n)) for k, v in back.summary().items()} == \
        {k: repr((v.value, v.ci, v.n)) for k, v in s.items()}           # repr: a 2-layer model's rho is NaN
    old = SimilarityResult(**{f: getattr(r, f) for f in r.__dataclass_fields__
                              if f not in ("prompt_adjacent", "base_texts", "echo_texts", "plan_texts")})
    assert old.summary()["first_pair_cos"].ci is None                           # a version-1 result: no interval


def test_one_heldout_text_gives_no_interval_rather_than_a_point(tiny_llama, tmp_path):
    """A bootstrap over one text resamples that text only: its "interval" would be the estimate itself."""
    cfg = SimilarityConfig(prompts=_texts(tmp_path, "p", "the cat sat on the mat", "numbers: 1 2 3 4 5 6"),
                           heldout=_texts(tmp_path, "h", "some held out words"), window=4, variants=("same",),
                           max_trials=1)
    s = run(SIMILARITY, tiny_llama, cfg, progress=False).summary()
    assert s["echo_same"].n == 1 and s["echo_same"].ci is None and s["plan_cost"].ci is None
    assert s["first_pair_cos"].n == 2 and s["first_pair_cos"].ci is not None       # two prompts: an interval


def test_the_shipped_run_opens_with_every_headline_interval():
    from analyses.data import data_path

    r = SimilarityResult.load(data_path("similarity", "smollm2-135m"))
    assert r.n_prompts >= SIMILARITY.min_samples and r.base_texts.shape[0] == 12
    s = r.summary()
    numbers = {k: v for k, v in s.items() if k != "plan_shared_layers"}
    assert all(v.ci is not None and v.n for v in numbers.values()), [k for k, v in numbers.items() if v.ci is None]
    assert s["echo_matched_minus_random"].ci[1] < 0             # what the README calls "matching beats the control"


@pytest.mark.parametrize("n,block", [(1, 32), (7, 3), (270, 32), (64, 32)])
def test_the_blockwise_gram_equals_one_product(n, block):
    """gram: the upper blocks computed, the lower mirrored: x @ x.T to rounding, exactly symmetric."""
    from analyses.similarity.measure import gram

    x = torch.randn(n, 500, generator=torch.Generator().manual_seed(n))
    g = gram(x, block)
    torch.testing.assert_close(g, x @ x.T, atol=1e-4, rtol=1e-5)
    assert torch.equal(g, g.T)


def test_cross_js_equals_the_float64_definition_on_sharp_and_flat_rows():
    """The pair sum (self terms once per map, one log per key per pair) equals JS from its definition
    (float64 js_rows) on rows from one-hot to uniform, and gives exactly 0 on identical maps."""
    from analyses.similarity.measure import cross_js, js_terms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 300, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0])[:, None, None]
    a = logits.softmax(-1)
    b = (logits + torch.randn(5, 6, 300, generator=g)).softmax(-1)
    got = cross_js(js_terms(a), js_terms(b, name="b"))
    want = torch.stack([torch.stack([js_rows(a[i].double(), b[j].double()).sum() for j in range(5)]) for i in range(5)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    same = cross_js(js_terms(a), js_terms(a.clone(), name="b"))
    assert torch.equal(same.diagonal(), torch.zeros(5, dtype=torch.float64))
