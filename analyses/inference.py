"""Statistics behind every headline number: intervals, paired tests and the "is it a gain?" rule.

Every analysis reports a number with its ``n`` and an interval (docs/methods.md, "Statistics").
The helpers here are small, seeded and checked against hand-computed values:

* :func:`mean_ci`, :func:`diff_ci`, :func:`paired_ci`: percentile bootstrap intervals (no BCa
  correction) of a mean, of a difference of two independent means, and of a before/after mean
  difference on the same items (items resampled together).
* :func:`mcnemar_exact` (paired binary outcomes) and :func:`sign_flip_test` (paired continuous
  outcomes; exact enumeration up to 16 items, seeded Monte Carlo beyond): two-sided p-values.
* :func:`wilson`: the Wilson score interval of a proportion.
* :func:`auroc`, :func:`auroc_ci`, :func:`direction_free_auroc`: AUROC and its bootstrap interval.
* :func:`jaccard`, :func:`overlap_coefficient`, :func:`overlap_ci`: set overlap of two circuits
  and its bootstrap over the prompts of each task.
* :func:`permutation_p`, :func:`within_group_permutations`, :func:`bh_qvalues`: permutation nulls
  (optionally within layers) and the Benjamini-Hochberg adjustment of a family of p-values.
* :func:`call_gain`: a before/after change is called a *gain* only when its paired interval
  excludes zero **and** its point estimate beats the upper end of the random-head control's interval.

>>> wilson(5, 10)                                    # doctest: +ELLIPSIS
Interval(estimate=0.5, lo=0.2365..., hi=0.7634..., n=10)
>>> mcnemar_exact([1, 1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1, 1])   # 6 vs 1 discordant pairs
0.125
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from probe.errors import InputError

N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval and the number of units (items, prompts) behind it."""

    estimate: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n})"


def _vec(x, what: str = "values") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise InputError(f"no {what} to summarise: give at least one item")
    return a


def _quantiles(vals, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), not {level}: e.g. 0.95")
    vals = np.asarray(vals, dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = N_BOOT,
              level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx)`` over ``n_boot`` resamples ``idx`` of ``range(n)``.

    Resamples where the statistic is undefined (it returns NaN) are skipped.
    """
    if n < 1:
        raise InputError("cannot bootstrap zero items")
    rng = np.random.default_rng(seed)
    vals = [statistic(rng.integers(0, n, n)) for _ in range(n_boot)]
    return _quantiles(vals, level)


def bootstrap_rows(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int = N_BOOT,
                   level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """:func:`bootstrap` with every resample at once: ``statistic(idx [n_boot, n]) -> [n_boot]`` values.

    The same resamples as :func:`bootstrap` with the same seed (so the same interval), for a statistic
    that vectorises over resamples (NaN resamples skipped).

    >>> x = np.arange(10.0)
    >>> bootstrap_rows(lambda idx: x[idx].mean(1), 10) == bootstrap(lambda idx: x[idx].mean(), 10)
    True
    """
    if n < 1:
        raise InputError("cannot bootstrap zero items")
    return _quantiles(statistic(np.random.default_rng(seed).integers(0, n, (n_boot, n))), level)


def _mean_boot(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap means of ``x`` ``[n_boot]`` (vectorised in blocks, memory-bounded)."""
    rng, out = np.random.default_rng(seed), []
    block = max(1, 2_000_000 // max(1, x.size))
    for s in range(0, n_boot, block):
        idx = rng.integers(0, x.size, (min(block, n_boot - s), x.size))
        out.append(x[idx].mean(1))
    return np.concatenate(out)


def mean_ci(x, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``x`` with its percentile bootstrap interval.

    >>> mean_ci([2.0, 2.0, 2.0])
    Interval(estimate=2.0, lo=2.0, hi=2.0, n=3)
    """
    x = _vec(x)
    lo, hi = _quantiles(_mean_boot(x, n_boot, seed), level)
    return Interval(float(x.mean()), lo, hi, int(x.size))


def paired_ci(after, before, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``after - before`` over the same items, items resampled together (``n`` = items).

    >>> paired_ci([1, 1, 0, 1], [0, 1, 0, 1]).estimate
    0.25
    """
    a, b = _vec(after, "paired items"), _vec(before, "paired items")
    if a.shape != b.shape:
        raise InputError(f"paired values need the same items: {a.size} after vs {b.size} before")
    return mean_ci(a - b, n_boot=n_boot, level=level, seed=seed)


def diff_ci(a, b, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for independent samples, each resampled on its own (``n`` = len(a) + len(b))."""
    a, b = _vec(a), _vec(b)
    d = _mean_boot(a, n_boot, seed) - _mean_boot(b, n_boot, seed + 1)
    lo, hi = _quantiles(d, level)
    return Interval(float(a.mean() - b.mean()), lo, hi, int(a.size + b.size))


def wilson(k: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of ``k`` successes in ``n`` trials."""
    from scipy.stats import norm

    if n <= 0 or not 0 <= k <= n:
        raise InputError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = float(norm.ppf((1 + level) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)      # exact ends (no 1e-17 from rounding)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Interval(p, lo, hi, int(n))


def mcnemar_exact(after, before) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes (binomial test on discordant pairs).

    ``b`` = items right after and wrong before, ``c`` = the reverse; ``p = min(1, 2 P(X <= min(b, c)))``
    with ``X ~ Binomial(b + c, 1/2)``; 1.0 when there is no discordant pair.
    """
    from scipy.stats import binom

    a, b0 = _vec(after, "paired items"), _vec(before, "paired items")
    if a.shape != b0.shape or not np.isin(np.concatenate([a, b0]), (0.0, 1.0)).all():
        raise InputError("McNemar needs two equally long 0/1 vectors over the same items")
    b = int(((a == 1) & (b0 == 0)).sum())
    c = int(((a == 0) & (b0 == 1)).sum())
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def sign_flip_test(after, before=None, *, n_perm: int = 10000, seed: int = 0, exact_max: int = 16) -> float:
    """Two-sided paired permutation test of ``mean(after - before) = 0`` by flipping signs of the differences.

    Exact (all ``2^n`` sign patterns) for ``n <= exact_max`` items, else ``n_perm`` seeded random
    patterns with ``p = (1 + #{|mean*| >= |mean|}) / (1 + n_perm)``. ``before=None``: ``after`` holds
    the differences.

    >>> sign_flip_test([1.0, 2.0, 3.0])     # only all-plus and all-minus reach |sum| = 6
    0.25
    """
    d = _vec(after, "paired items") - (0.0 if before is None else _vec(before, "paired items"))
    obs = abs(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    if d.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float((np.abs(signs @ d) >= obs - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n_perm, 1000):
        signs = rng.choice((-1.0, 1.0), size=(min(1000, n_perm - s), d.size))
        hits += int((np.abs(signs @ d) >= obs - tol).sum())
    return float((1 + hits) / (1 + n_perm))


# ----------------------------------------------------------------------------- AUROC

def auroc(y, s) -> float:
    """Area under the ROC curve of scores ``s`` for binary labels ``y`` (ties count half)."""
    y, s = np.asarray(y).ravel(), np.asarray(s, np.float64).ravel()
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        raise InputError("AUROC needs both classes among the items")
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def direction_free_auroc(y, s) -> float:
    """``max(AUROC, 1 - AUROC)``: a baseline's AUROC when its direction is not fixed in advance.

    Optimistic by construction (it picks the better direction on the evaluation items); a fitted
    1-feature logistic regression on the training items is the honest alternative.
    """
    a = auroc(y, s)
    return max(a, 1 - a)


def auroc_ci(y, s, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """AUROC with a percentile bootstrap interval over items (resamples with one class skipped)."""
    y, s = np.asarray(y).ravel(), np.asarray(s, np.float64).ravel()

    def stat(i):
        yi = y[i]
        return auroc(yi, s[i]) if 0 < yi.sum() < len(yi) else math.nan

    lo, hi = bootstrap(stat, len(y), n_boot=n_boot, level=level, seed=seed)
    return Interval(auroc(y, s), lo, hi, int(len(y)))


# ----------------------------------------------------------------------------- set overlap

def jaccard(a, b) -> float:
    """``|A∩B| / |A∪B|`` (NaN for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else math.nan


def overlap_coefficient(a, b) -> float:
    """``|A∩B| / min(|A|, |B|)`` (NaN when either set is empty)."""
    a, b = set(a), set(b)
    return len(a & b) / min(len(a), len(b)) if a and b else math.nan


OVERLAPS = {"jaccard": jaccard, "overlap_coefficient": overlap_coefficient}


def top_set(scores, k: int) -> frozenset[int]:
    """Indices of the ``k`` largest ``|scores|`` (flattened; ties broken by index)."""
    s = np.abs(np.nan_to_num(np.asarray(scores, np.float64).ravel(), nan=-np.inf))
    return frozenset(np.argsort(-s, kind="stable")[:k].tolist())


def overlap_ci(per_a, per_b, k: int, metric: str = "jaccard", *, n_boot: int = 500, level: float = 0.95,
               seed: int = 0) -> Interval:
    """Overlap of the top-``k`` sets of two tasks' mean scores, with a bootstrap over each task's prompts.

    ``per_a [n_a, units]``, ``per_b [n_b, units]``: per-prompt scores of the same units (heads).
    Each resample draws the prompts of each task with replacement, averages, re-selects both sets.
    """
    if metric not in OVERLAPS:
        raise InputError(f"metric must be one of {sorted(OVERLAPS)}, not {metric!r}")
    A, B = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (per_a, per_b))
    if A.shape[1] != B.shape[1] or not 0 < k <= A.shape[1]:
        raise InputError(f"both tasks need scores of the same units and 0 < k <= units ({A.shape}, {B.shape}, k={k})")
    f, rng = OVERLAPS[metric], np.random.default_rng(seed)
    vals = [f(top_set(A[rng.integers(0, len(A), len(A))].mean(0), k), top_set(B[rng.integers(0, len(B), len(B))].mean(0), k))
            for _ in range(n_boot)]
    lo, hi = _quantiles(vals, level)
    return Interval(f(top_set(A.mean(0), k), top_set(B.mean(0), k)), lo, hi, int(len(A) + len(B)))


# ----------------------------------------------------------------------------- permutation nulls

def permutation_p(observed: float, null, alternative: str = "two-sided") -> float:
    """``(1 + #hits) / (1 + n)`` over ``n`` null draws; hits: ``|null| >= |observed|`` (two-sided) or
    ``null >= observed`` (``"greater"``). NaN draws are skipped; NaN when nothing is left.

    >>> permutation_p(0.9, [0.1, -0.95, 0.3]), permutation_p(0.9, [0.1, -0.95, 0.3], "greater")
    (0.5, 0.25)
    """
    null = np.asarray(null, np.float64).ravel()
    null = null[~np.isnan(null)]
    if np.isnan(observed) or not null.size:
        return math.nan
    if alternative not in ("two-sided", "greater"):
        raise InputError(f"alternative must be 'two-sided' or 'greater', not {alternative!r}")
    tol = 1e-12 * max(1.0, abs(observed))
    hits = (np.abs(null) >= abs(observed) - tol) if alternative == "two-sided" else (null >= observed - tol)
    return float((1 + hits.sum()) / (1 + null.size))


def within_group_permutations(groups, n_perm: int, seed: int = 0) -> np.ndarray:
    """``[n_perm, n]`` index permutations that move items only within their group (e.g. heads within a layer).

    >>> p = within_group_permutations([0, 0, 1, 1, 1], 50)
    >>> bool((np.sort(p[:, :2], 1) == [0, 1]).all() and (np.sort(p[:, 2:], 1) == [2, 3, 4]).all())
    True
    """
    g = np.asarray(groups)
    base = np.lexsort((np.arange(g.size), g))
    rng = np.random.default_rng(seed)
    out = np.empty((n_perm, g.size), dtype=np.int64)
    for b in range(n_perm):
        out[b, base] = np.lexsort((rng.random(g.size), g))
    return out


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a family of tests (NaN entries stay NaN).

    >>> bh_qvalues([0.01, 0.04, 0.03, float("nan")]).round(3).tolist()[:3]
    [0.03, 0.04, 0.04]
    """
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not ok.size:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order] * ok.size / np.arange(1, ok.size + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


# ----------------------------------------------------------------------------- gain vs random control

@dataclass(frozen=True)
class GainVerdict:
    """A before/after change judged against random-head controls (see :func:`call_gain`)."""

    gain: Interval            # mean(treated - plain) over items, paired bootstrap
    control: Interval         # mean gain of the random draws: draws x items bootstrap
    p_value: float            # paired test of treated vs plain (McNemar for 0/1, sign-flip otherwise)
    test: str
    n_draws: int
    is_gain: bool
    reason: str

    def to_dict(self) -> dict:
        return {"gain": self.gain.to_dict(), "control": self.control.to_dict(), "p_value": self.p_value,
                "test": self.test, "n_draws": self.n_draws, "is_gain": self.is_gain, "reason": self.reason}


def control_ci(plain, controls, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean gain of random-head controls ``controls [draws, items]`` over ``plain [items]``.

    Two-level bootstrap: draws resampled (which random set) and items resampled (which prompts).
    """
    p = _vec(plain, "items")
    C = np.asarray(controls, np.float64).reshape(-1, p.size)
    if C.shape[0] == 0:
        raise InputError("no random-head control draws: run at least one (10 or more to call a gain)")
    G = C - p[None]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        d, i = rng.integers(0, G.shape[0], G.shape[0]), rng.integers(0, p.size, p.size)
        vals[b] = G[d][:, i].mean()
    lo, hi = _quantiles(vals, level)
    return Interval(float(G.mean()), lo, hi, int(G.shape[0]))


def call_gain(plain, treated, controls, *, min_draws: int = 10, n_boot: int = N_BOOT, level: float = 0.95,
              seed: int = 0) -> GainVerdict:
    """Is ``treated`` a gain over ``plain`` on the same items, beyond what random head sets give?

    A gain requires (1) at least ``min_draws`` control draws, (2) the paired interval of
    ``treated - plain`` above zero, and (3) the gain's point estimate above the upper end of the
    control's interval (:func:`control_ci`). Per-item values: 0/1 (accuracy) or continuous (log-prob).
    """
    p, t = _vec(plain, "items"), _vec(treated, "items")
    if p.shape != t.shape:
        raise InputError(f"plain and treated need the same items: {p.size} vs {t.size}")
    gain = paired_ci(t, p, n_boot=n_boot, level=level, seed=seed)
    ctrl = control_ci(p, controls, n_boot=n_boot, level=level, seed=seed + 1)
    binary = np.isin(np.concatenate([p, t]), (0.0, 1.0)).all()
    pval, test = (mcnemar_exact(t, p), "mcnemar_exact") if binary else (sign_flip_test(t, p, seed=seed), "sign_flip")
    if ctrl.n < min_draws:
        ok, why = False, f"only {ctrl.n} random draws (need {min_draws})"
    elif not gain.lo > 0:
        ok, why = False, f"paired interval of the change [{gain.lo:.4g}, {gain.hi:.4g}] includes or is below 0"
    elif not gain.estimate > ctrl.hi:
        ok, why = False, f"change {gain.estimate:.4g} does not beat the random control's upper bound {ctrl.hi:.4g}"
    else:
        ok, why = True, f"change {gain.estimate:.4g} > random control's upper bound {ctrl.hi:.4g}, paired CI > 0"
    return GainVerdict(gain, ctrl, pval, test, ctrl.n, bool(ok), why)
