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

from ..inference import Interval, bootstrap_rows, mean_ci
from .echo import pooled


def adjacent_cis(prompt_adjacent: np.ndarray) -> dict[str, Interval]:
    """First pair, inner pairs' mean and last pair of ``[prompts, layer-1]`` adjacent cosines, over prompts."""
    a = np.asarray(prompt_adjacent, dtype=np.float64)
    inner = a[:, 1:-1] if a.shape[1] > 2 else a
    return {"first": mean_ci(a[:, 0]), "inner": mean_ci(inner.mean(1)), "last": mean_ci(a[:, -1])}


def _interval(statistic, n: int) -> Interval:
    """``statistic(idx)`` (``idx [..., n]`` text indices -> one value per row of ``idx``) at every text and
    resampled; every resample at once (:func:`analyses.inference.bootstrap_rows`)."""
    lo, hi = bootstrap_rows(statistic, n)
    return Interval(float(statistic(np.arange(n)[None])[0]), lo, hi, int(n))


def _mean_loss(t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pooled loss of texts ``idx [B, n]`` of ``t [.., texts, 2]``, averaged over the leading conditions: ``[B]``."""
    per = pooled(t[..., idx, :])                                  # [.., B]
    return per.reshape(-1, idx.shape[0]).mean(0)


def increase_ci(cond: np.ndarray, base: np.ndarray) -> Interval:
    """Loss increase (nats/token) of ``cond`` over ``base``, ``[.., texts, 2]``; texts resampled, paired.

    ``cond`` may hold several conditions on its leading axes (e.g. every adjacent pair of a variant):
    the figure is then their mean increase.
    """
    cond, base = np.asarray(cond, np.float64), np.asarray(base, np.float64)
    return _interval(lambda idx: _mean_loss(cond, idx) - _mean_loss(base, idx), base.shape[0])


def difference_ci(a: np.ndarray, b: np.ndarray) -> Interval:
    """Mean loss of conditions ``a`` minus that of ``b`` (both ``[.., texts, 2]``), texts resampled together."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return _interval(lambda idx: _mean_loss(a, idx) - _mean_loss(b, idx), a.shape[-2])


def spearman_ci(x: np.ndarray, y: np.ndarray) -> Interval:
    """Spearman's rho of ``x`` and ``y`` (Pearson on average ranks) with its interval over the pairs
    (resamples where either side is constant are skipped)."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def rho(idx):
        rx, ry = rankdata(x[idx], axis=-1), rankdata(y[idx], axis=-1)
        rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
        den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)

    return _interval(rho, len(x))
