"""Score agreement: does one per-head score predict another? (docs/methods.md §7)

For every pair of :class:`~.scores.Score` s, over the heads where both are defined:

* **rank agreement**: Spearman's rho (a categorical score, e.g. the similarity family: eta^2, the
  share of the other score's rank variance the labels explain, Kruskal-Wallis' H / (n - 1)), with
  two permutation nulls: heads permuted freely (``p_perm``) and only within their layer
  (``p_layer``: agreement beyond a shared trend over depth), and a percentile bootstrap interval
  over the **items** behind the scores (prompts, samples, texts; both sides resampled, together when
  they were measured on the same items) or, when neither score has items, over the **heads**
  (``resampled`` says which; a head-level interval says how stable the statistic is across heads,
  not how it would change with other prompts). Over items the interval is the *basic* bootstrap
  ``[2 r - q_hi, 2 r - q_lo]`` (clipped to the range): a resampled score is a mean with twice the
  sampling noise, which pulls every replicate's correlation towards 0, and the basic interval
  removes that shift to first order. It is an interval for the agreement of the mean scores (as
  with unlimited items); the estimate itself is attenuated by the item noise, so with few or noisy
  items the interval can lie above it;
* **top-k overlap**: Jaccard and overlap coefficient of the two head sets (top ``k`` by score; a
  binary score's set is its selected heads; a layer-level score has none), against a null that
  keeps each layer's share of the set (the second score permuted within layers): ``null_jaccard``
  and the one-sided ``p_overlap``; intervals from the same item bootstrap (sets re-selected).

``q_rank`` and ``q_overlap`` are Benjamini-Hochberg q-values over all pairs of the table.

>>> import numpy as np
>>> from analyses.atlas.scores import Score
>>> rng = np.random.default_rng(0)
>>> a = rng.random((6, 8)); b = a + 0.05 * rng.random((6, 8)); c = rng.random((6, 8))
>>> t = agreement_table([Score("a", "x", a), Score("b", "x", b), Score("c", "x", c)], k=4, n_boot=50, n_perm=200)
>>> r = t.set_index(["score_a", "score_b"]).loc[("a", "b")]
>>> float(r["jaccard"]), r["resampled"], bool(r["value"] > 0.9)
(1.0, 'heads', True)
"""
from __future__ import annotations

import math
import zlib
from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from probe.heads import HeadId

from .. import inference as inf
from .scores import Score

COLUMNS = ["score_a", "score_b", "source_a", "source_b", "method", "n_heads", "value", "lo", "hi", "resampled",
           "n_items_a", "n_items_b", "p_perm", "p_layer", "k_a", "k_b", "jaccard", "jaccard_lo", "jaccard_hi",
           "overlap", "overlap_lo", "overlap_hi", "null_jaccard", "p_overlap", "shared"]


def spearman_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of rank rows ``[B, n]`` (Spearman's rho when given ranks); NaN for a constant row."""
    x = rx - rx.mean(-1, keepdims=True)
    y = ry - ry.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def eta2_rows(rx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Share of the rank variance of ``rx [B, n]`` explained by the groups ``labels [B, n]`` (eta^2)."""
    out = np.empty(len(rx))
    for b, (r, g) in enumerate(zip(rx, labels)):
        _, inv = np.unique(g, return_inverse=True)
        sums, counts = np.bincount(inv, r), np.bincount(inv)
        total = ((r - r.mean()) ** 2).sum()
        out[b] = (sums ** 2 / counts).sum() - r.sum() ** 2 / r.size
        out[b] = out[b] / total if total > 0 else math.nan
    return out


def top_masks(V: np.ndarray, k: int, binary: bool) -> np.ndarray:
    """``[B, n]`` membership of each row's head set: the ``k`` highest values, or a binary score's ones."""
    if binary:
        return V == 1
    M = np.zeros(V.shape, bool)
    np.put_along_axis(M, np.argsort(-V, axis=-1, kind="stable")[..., :k], True, axis=-1)
    return M


def overlaps(MA: np.ndarray, MB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard and overlap coefficient of set rows (NaN for an empty union / an empty set)."""
    inter = (MA & MB).sum(-1).astype(float)
    a, b = MA.sum(-1), MB.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(a + b - inter > 0, inter / (a + b - inter), np.nan)
        o = np.where(np.minimum(a, b) > 0, inter / np.minimum(a, b), np.nan)
    return j, o


def _seed(key: str, seed: int) -> int:
    return (zlib.crc32(key.encode()) + 7919 * seed) % 2**32


def item_draws(score: Score, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, layer * head]`` head values from resampled items; the same items give the same draws."""
    rng = np.random.default_rng(_seed(score.item_key or score.name, seed))
    return score.resampled(rng.integers(0, score.n_items, (n_boot, score.n_items)))


def agreement_table(scores: list[Score], *, k: int = 10, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0,
                    level: float = 0.95) -> pd.DataFrame:
    """One row per pair of ``scores`` (see the module docstring); heads are ``[layer, head]`` cells."""
    if not scores:
        return pd.DataFrame(columns=COLUMNS + ["q_rank", "q_overlap"])
    L, H = scores[0].values.shape
    layers = np.repeat(np.arange(L), H)
    draws = {s.name: item_draws(s, n_boot, seed) for s in scores if s.items is not None}
    rows = [pair_row(a, b, draws, layers, H, k=k, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level)
            for a, b in combinations(scores, 2) if not (a.kind == "categorical" and b.kind == "categorical")]
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["q_rank"] = inf.bh_qvalues(out["p_layer"].to_numpy(float))
    out["q_overlap"] = inf.bh_qvalues(out["p_overlap"].to_numpy(float))
    return out


def pair_row(a: Score, b: Score, draws: dict, layers: np.ndarray, n_heads: int, *, k: int, n_boot: int,
             n_perm: int, seed: int, level: float) -> dict:
    """The row of one pair (a categorical score always goes second)."""
    if a.kind == "categorical":
        a, b = b, a
    keep = np.flatnonzero(np.isfinite(a.flat()) & np.isfinite(b.flat()))
    row = {"score_a": a.name, "score_b": b.name, "source_a": a.source, "source_b": b.source,
           "method": "eta2" if b.kind == "categorical" else "spearman", "n_heads": int(keep.size),
           "n_items_a": a.n_items, "n_items_b": b.n_items}
    if keep.size < 3:
        return row | {"resampled": "none (fewer than 3 heads with both scores)"}
    X, Y, row["resampled"] = _resamples(a, b, keep, draws, n_boot, seed)
    row |= _rank_agreement(a.flat()[keep], b.flat()[keep], X, Y, layers[keep], row["method"], n_perm, seed, level,
                           basic=row["resampled"] != "heads")
    if {a.kind, b.kind} <= {"continuous", "binary"}:
        row |= _overlap(a, b, keep, X, Y, layers[keep], n_heads, k, n_perm, seed, level,
                        resampled=row["resampled"] != "heads")
    return row


def _resamples(a: Score, b: Score, keep, draws, n_boot: int, seed: int):
    """Resampled head values ``[B, n]`` of both scores, and what was resampled."""
    if a.items is None and b.items is None:
        idx = np.random.default_rng(_seed(a.name + "|" + b.name, seed)).integers(0, keep.size, (n_boot, keep.size))
        return a.flat()[keep][idx], b.flat()[keep][idx], "heads"
    X = draws[a.name][:, keep] if a.items is not None else np.broadcast_to(a.flat()[keep], (n_boot, keep.size))
    Y = draws[b.name][:, keep] if b.items is not None else np.broadcast_to(b.flat()[keep], (n_boot, keep.size))
    if a.items is not None and b.items is not None and a.item_key == b.item_key:
        return X, Y, "items (shared)"
    return X, Y, "items: " + ", ".join(s.name for s in (a, b) if s.items is not None)


def _rank_agreement(x, y, X, Y, layers, method: str, n_perm: int, seed: int, level: float, basic: bool) -> dict:
    rx = rankdata(x)
    if method == "spearman":
        ry = rankdata(y)
        stat = lambda r, perm: spearman_rows(r[None] if r.ndim == 1 else r, ry[perm])  # noqa: E731
        value = float(spearman_rows(rx[None], ry[None])[0])
        boot = spearman_rows(rankdata(X, axis=-1), rankdata(Y, axis=-1))
    else:
        stat = lambda r, perm: eta2_rows(np.broadcast_to(r, perm.shape), y[perm])  # noqa: E731
        value = float(eta2_rows(rx[None], y[None])[0])
        boot = eta2_rows(rankdata(X, axis=-1), Y)
    rng = np.random.default_rng(seed + 1)
    free = np.argsort(rng.random((n_perm, x.size)), axis=1)
    within = inf.within_group_permutations(layers, n_perm, seed + 2)
    two = "two-sided" if method == "spearman" else "greater"
    lo, hi = _interval(boot, level)
    if basic:                                   # item resampling: the basic interval (module docstring)
        bottom = 0.0 if method == "eta2" else -1.0
        lo, hi = max(bottom, 2 * value - hi), min(1.0, 2 * value - lo)
    return {"value": value, "lo": lo, "hi": hi, "p_perm": inf.permutation_p(value, stat(rx, free), two),
            "p_layer": inf.permutation_p(value, stat(rx, within), two)}


def _overlap(a: Score, b: Score, keep, X, Y, layers, n_heads: int, k: int, n_perm: int, seed: int, level: float,
             resampled: bool) -> dict:
    x, y = a.flat()[keep], b.flat()[keep]
    k = min(k, keep.size)
    ba, bb = a.kind == "binary", b.kind == "binary"
    MA, MB = top_masks(x[None], k, ba), top_masks(y[None], k, bb)
    j, o = (float(v[0]) for v in overlaps(MA, MB))
    within = inf.within_group_permutations(layers, n_perm, seed + 3)
    null_j, _ = overlaps(np.broadcast_to(MA, within.shape), top_masks(y[within], k, bb))
    shared = [HeadId(int(i) // n_heads, int(i) % n_heads) for i in keep[(MA & MB)[0]]]
    row = {"k_a": int(MA.sum()), "k_b": int(MB.sum()), "jaccard": j, "overlap": o,
           "null_jaccard": float(np.nanmean(null_j)) if np.isfinite(null_j).any() else math.nan,
           "p_overlap": inf.permutation_p(j, null_j, "greater"), "shared": ", ".join(map(str, shared))}
    if resampled:
        bj, bo = overlaps(top_masks(np.asarray(X), k, ba), top_masks(np.asarray(Y), k, bb))
        (row["jaccard_lo"], row["jaccard_hi"]), (row["overlap_lo"], row["overlap_hi"]) = \
            _interval(bj, level), _interval(bo, level)
    return row


def _interval(vals, level: float) -> tuple[float, float]:
    vals = np.asarray(vals, np.float64)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return math.nan, math.nan
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
