"""Statistics helpers (analyses.inference) against hand-computed values."""
import math

import numpy as np
import pytest

from analyses import inference as inf
from probe.errors import InputError


def test_wilson_matches_the_textbook_values():
    w = inf.wilson(5, 10)     # p = 0.5: centre 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10)
    assert (w.estimate, w.n) == (0.5, 10)
    assert w.lo == pytest.approx(0.236593, abs=1e-6) and w.hi == pytest.approx(0.763407, abs=1e-6)
    w0 = inf.wilson(0, 10)    # k = 0: lower bound 0, upper (z^2/n) / (1 + z^2/n)
    z = 1.959963985
    assert w0.lo == 0.0 and w0.hi == pytest.approx((z * z / 10) / (1 + z * z / 10), abs=1e-9)
    with pytest.raises(InputError):
        inf.wilson(11, 10)


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    after = [1, 1, 1, 1, 1, 1, 0, 1, 0]
    before = [0, 0, 0, 0, 0, 0, 1, 1, 0]      # b = 6, c = 1: p = 2 * (1 + 7) / 2^7
    assert inf.mcnemar_exact(after, before) == pytest.approx(16 / 128)
    assert inf.mcnemar_exact(before, after) == pytest.approx(16 / 128)
    assert inf.mcnemar_exact([1, 0], [0, 1]) == 1.0          # b = c
    assert inf.mcnemar_exact([1, 0], [1, 0]) == 1.0          # no discordant pair
    assert inf.mcnemar_exact([1] * 10, [0] * 10) == pytest.approx(2 / 1024)
    with pytest.raises(InputError):
        inf.mcnemar_exact([0.5, 1], [0, 1])


def test_sign_flip_exact_enumeration():
    assert inf.sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)          # sums 6 and -6 only
    assert inf.sign_flip_test([1.0, 1.0, 1.0, 1.0]) == pytest.approx(2 / 16)
    assert inf.sign_flip_test([1.0, -1.0]) == 1.0
    assert inf.sign_flip_test([3.0, 4.0, 5.0], [2.0, 2.0, 2.0]) == pytest.approx(2 / 8)   # d = 1, 2, 3
    # Monte Carlo beyond 16 items: a large consistent shift gets the smallest p it can
    p = inf.sign_flip_test(np.ones(40), n_perm=999, seed=1)
    assert p == pytest.approx(1 / 1000)
    assert inf.sign_flip_test(np.ones(40), n_perm=999, seed=1) == p                   # seeded


def test_mean_ci_percentiles_match_the_enumerated_bootstrap():
    # x = [0, 0, 1]: resampled means k/3 with k ~ Bin(3, 1/3): P = 8/27, 12/27, 6/27, 1/27.
    # 95%: [0, 1] (cumulative at 2/3 is 26/27 < 0.975); 90%: [0, 2/3] (26/27 > 0.95)
    ci = inf.mean_ci([0, 0, 1], n_boot=20000, seed=3)
    assert (ci.estimate, ci.lo, ci.hi, ci.n) == (pytest.approx(1 / 3), 0.0, 1.0, 3)
    ci90 = inf.mean_ci([0, 0, 1], n_boot=20000, level=0.90, seed=3)
    assert (ci90.lo, ci90.hi) == (0.0, pytest.approx(2 / 3))
    assert inf.mean_ci([0, 0, 1], seed=5) == inf.mean_ci([0, 0, 1], seed=5)
    with pytest.raises(InputError):
        inf.mean_ci([])


def test_paired_and_unpaired_differences():
    p = inf.paired_ci([1, 1, 0], [1, 0, 0], n_boot=20000, level=0.90, seed=3)   # d = [0, 1, 0]
    assert (p.estimate, p.lo, p.hi, p.n) == (pytest.approx(1 / 3), 0.0, pytest.approx(2 / 3), 3)
    d = inf.diff_ci([1, 1], [0, 0])
    assert (d.estimate, d.lo, d.hi, d.n) == (1.0, 1.0, 1.0, 4)
    # independent resampling: a = [0, 1] gives means 0, .5, 1 (1/4, 1/2, 1/4); b = [0, 0] is fixed
    d2 = inf.diff_ci([0, 1], [0, 0], n_boot=20000, level=0.4, seed=0)   # central 40%: only 0.5
    assert (d2.lo, d2.hi) == (0.5, 0.5)
    with pytest.raises(InputError):
        inf.paired_ci([1, 0], [1])


def test_auroc_and_its_interval():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]      # pairs (pos > neg): .35>.1, .8>.1, .8>.4 -> 3/4
    assert inf.auroc(y, s) == pytest.approx(0.75)
    assert inf.auroc(y, [-v for v in s]) == pytest.approx(0.25)
    assert inf.direction_free_auroc(y, [-v for v in s]) == pytest.approx(0.75)
    assert inf.auroc([0, 1], [0.5, 0.5]) == 0.5      # a tie counts half
    ci = inf.auroc_ci([0, 0, 0, 1, 1, 1], [1, 2, 3, 4, 5, 6], n_boot=300)
    assert (ci.estimate, ci.lo, ci.hi) == (1.0, 1.0, 1.0)
    ci = inf.auroc_ci(y, s, n_boot=500)
    assert ci.lo <= 0.75 <= ci.hi and ci.lo < ci.hi
    with pytest.raises(InputError):
        inf.auroc([1, 1], [0.2, 0.3])


def test_overlaps_and_their_bootstrap():
    assert inf.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert inf.overlap_coefficient({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 3)
    assert math.isnan(inf.jaccard(set(), set()))
    assert inf.top_set([3, -5, 1, 0], 2) == {0, 1}           # by |score|
    A = np.array([[3, 2, 1, 0]] * 4)                          # every prompt agrees: degenerate bootstrap
    B = np.array([[0, 2, 3, 1]] * 5)                          # top-2 {0, 1} vs {1, 2}
    j = inf.overlap_ci(A, B, 2)
    assert (j.estimate, j.lo, j.hi, j.n) == (pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3), 9)
    assert inf.overlap_ci(A, B, 2, "overlap_coefficient").estimate == 0.5
    with pytest.raises(InputError):
        inf.overlap_ci(A, B[:, :3], 2)


def test_control_interval_resamples_draws_and_items():
    # draws gain 1 and 0 on both items: resampled draw means 0, .5, 1 with 1/4, 1/2, 1/4
    c = inf.control_ci([0, 0], [[1, 1], [0, 0]], n_boot=20000, seed=0)
    assert (c.estimate, c.lo, c.hi, c.n) == (0.5, 0.0, 1.0, 2)


def test_call_gain_needs_ci_above_zero_and_above_the_random_control():
    rng = np.random.default_rng(0)
    plain = (rng.random(300) < 0.5).astype(float)
    treated = plain.copy()
    treated[np.flatnonzero(plain == 0)[:60]] = 1.0            # +0.2 accuracy, 60 vs 0 discordant pairs
    flat = [plain.copy() for _ in range(10)]
    v = inf.call_gain(plain, treated, flat, n_boot=500)
    assert v.is_gain and v.test == "mcnemar_exact" and v.p_value < 1e-10
    assert v.gain.estimate == pytest.approx(0.2) and v.control.estimate == 0.0
    assert not inf.call_gain(plain, treated, flat[:5], n_boot=500).is_gain           # too few draws
    lucky = [treated.copy() for _ in range(10)]                                       # random heads do as well
    v2 = inf.call_gain(plain, treated, lucky, n_boot=500)
    assert not v2.is_gain and "random control" in v2.reason
    v3 = inf.call_gain(plain, plain, flat, n_boot=500)                                # no change at all
    assert not v3.is_gain and v3.p_value == 1.0
    cont = inf.call_gain(np.zeros(20), np.full(20, 0.5) + rng.normal(0, 0.01, 20), [np.zeros(20)] * 10, n_boot=300)
    assert cont.test == "sign_flip" and cont.is_gain
