"""Intervals of the similarity headlines: prompts, held-out texts and layer pairs resampled.

Each figure is resampled over what varies behind it: the adjacent-layer cosines over the prompts
(each prompt's own cosine matrix is kept), the echo and plan loss increases over the held-out
texts (per-text loss sums and token counts, so a resample pools exactly like the estimate, and the
baseline and the echo are resampled together: a paired interval), and the rank correlation between
similarity and echo cost over the layer pairs. Percentile bootstrap, seeded (analyses.inference).

Methods: docs/methods.md §4 and "Statistics".
"""
from __future__ import annotations

import numpy as np

from ..inference import Interval, bootstrap, mean_ci
from .echo import pooled


def adjacent_cis(prompt_adjacent: np.ndarray) -> dict[str, Interval]:
    """First pair, inner pairs' mean and last pair of ``[prompts, layer-1]`` adjacent cosines, over prompts."""
    a = np.asarray(prompt_adjacent, dtype=np.float64)
    inner = a[:, 1:-1] if a.shape[1] > 2 else a
    return {"first": mean_ci(a[:, 0]), "inner": mean_ci(inner.mean(1)), "last": mean_ci(a[:, -1])}


def increase_ci(cond: np.ndarray, base: np.ndarray) -> Interval:
    """Loss increase (nats/token) of ``cond`` over ``base``, ``[.., texts, 2]``; texts resampled, paired.

    ``cond`` may hold several conditions on its leading axes (e.g. every adjacent pair of a variant):
    the figure is then their mean increase.
    """
    cond, base = np.asarray(cond, np.float64), np.asarray(base, np.float64)

    def stat(idx):
        return float(np.mean(pooled(cond[..., idx, :]) - pooled(base[idx])))

    lo, hi = bootstrap(stat, base.shape[0])
    return Interval(stat(np.arange(base.shape[0])), lo, hi, int(base.shape[0]))


def difference_ci(a: np.ndarray, b: np.ndarray) -> Interval:
    """Mean loss of conditions ``a`` minus that of ``b`` (both ``[.., texts, 2]``), texts resampled together."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.shape[-2]

    def stat(idx):
        return float(np.mean(pooled(a[..., idx, :])) - np.mean(pooled(b[..., idx, :])))

    lo, hi = bootstrap(stat, n)
    return Interval(stat(np.arange(n)), lo, hi, int(n))


def spearman_ci(x: np.ndarray, y: np.ndarray) -> Interval:
    """Spearman's rho of ``x`` and ``y`` with its interval over the pairs (resampled pairs with ties only are skipped)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def stat(idx):
        if np.ptp(x[idx]) == 0 or np.ptp(y[idx]) == 0:
            return float("nan")
        return float(spearmanr(x[idx], y[idx])[0])

    lo, hi = bootstrap(stat, len(x))
    return Interval(stat(np.arange(len(x))), lo, hi, int(len(x)))
