"""Circuit selection and overlap between tasks (Merullo et al., ICLR 2024: ~78% of in-circuit heads shared).

The denominator of the published 78% is not stated, so both are reported: Jaccard
``|A∩B|/|A∪B|`` and the overlap coefficient ``|A∩B|/min(|A|,|B|)``, plus Spearman's rank correlation
of the two tasks' head scores (|score|, over all heads). Uncertainty comes from a bootstrap over
prompts (each task's prompts resampled, scores recomputed, circuits re-selected); the null is
random head sets of the same sizes.

**Circuit rule** (one patching stage: each head's total effect on the logit difference): the top
``frac`` of heads by |normalised score| (at least one head). Default 5% (14 of SmolLM2's 270 heads);
the paper's 2% per stage is ``frac=0.02``.

>>> jaccard({1, 2, 3}, {2, 3, 4}), overlap_coefficient({1, 2}, {2, 3, 4})
(0.5, 0.5)
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr

from probe.heads import HeadId

from ..inference import jaccard, overlap_coefficient  # noqa: F401  (one definition, shared)


def select_circuit(scores, frac: float = 0.05) -> list[HeadId]:
    """Top ``frac`` of heads by |score| from an ``[L, H]`` array (at least one head)."""
    s = np.abs(np.asarray(scores, dtype=float))
    if not 0 < frac <= 1:
        from probe.errors import InputError

        raise InputError(f"circuit fraction must be in (0, 1], not {frac}: e.g. 0.02 for the paper's top 2%")
    k = max(1, int(round(frac * s.size)))
    flat = np.argsort(-np.nan_to_num(s, nan=-np.inf).ravel(), kind="stable")[:k]
    return sorted(HeadId(int(i // s.shape[1]), int(i % s.shape[1])) for i in flat)


def rank_correlation(sa, sb) -> float:
    """Spearman correlation of |scores| over all heads."""
    r = spearmanr(np.abs(np.ravel(sa)), np.abs(np.ravel(sb))).statistic
    return float(r)


OVERLAP_COLUMNS = ["task_a", "task_b", "metric", "value", "lo", "hi", "null_mean", "null_q95", "p_null"]
METRICS = {"jaccard": jaccard, "overlap_coefficient": overlap_coefficient}


def pair_metrics(sa, sb, frac: float) -> dict[str, float]:
    ca, cb = select_circuit(sa, frac), select_circuit(sb, frac)
    out = {name: f(ca, cb) for name, f in METRICS.items()}
    out["spearman"] = rank_correlation(sa, sb)
    return out


def bootstrap_ci(statistic, n: int, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx)`` over ``n_boot`` resamples ``idx`` of ``range(n)``."""
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    lo, hi = np.nanquantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def random_null(n_heads: int, k_a: int, k_b: int, n_draws: int = 2000, seed: int = 0) -> dict[str, tuple]:
    """Jaccard / overlap coefficient of random head sets of sizes ``k_a, k_b``: (mean, 95th percentile, draws)."""
    rng = np.random.default_rng(seed)
    out = {}
    draws = {name: [] for name in METRICS}
    for _ in range(n_draws):
        a, b = set(rng.choice(n_heads, k_a, replace=False)), set(rng.choice(n_heads, k_b, replace=False))
        for name, f in METRICS.items():
            draws[name].append(f(a, b))
    for name, v in draws.items():
        v = np.asarray(v)
        out[name] = (float(v.mean()), float(np.quantile(v, 0.95)), v)
    return out


def overlap_table(per_prompt: dict, frac: float = 0.05, n_boot: int = 200, seed: int = 0) -> list[dict]:
    """Rows (task_a, task_b, metric, value, lo, hi, null_mean, null_q95, p_null) for every task pair.

    ``per_prompt[name] = (ld_patched [N, L, H], ld_clean [N], ld_corr [N])`` as numpy arrays.
    """
    from .patching import normalised
    import torch

    def scores(name, idx=None):
        p, c, r = (torch.as_tensor(x, device="cpu") for x in per_prompt[name])
        return normalised(p, c, r, idx).numpy()

    names, rows = list(per_prompt), []
    full = {n: scores(n) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            value = pair_metrics(full[a], full[b], frac)
            rng = np.random.default_rng(seed + i)
            na, nb = len(per_prompt[a][1]), len(per_prompt[b][1])
            boots = [pair_metrics(scores(a, rng.integers(0, na, na)), scores(b, rng.integers(0, nb, nb)), frac)
                     for _ in range(n_boot)]
            size = full[a].size
            k = max(1, int(round(frac * size)))
            null = random_null(size, k, k, seed=seed)
            for metric, v in value.items():
                vals = np.array([bt[metric] for bt in boots])
                lo, hi = np.nanquantile(vals, [0.025, 0.975])
                nm, nq, draws = null.get(metric, (math.nan, math.nan, None))
                p = float((draws >= v).mean()) if draws is not None else math.nan
                rows.append({"task_a": a, "task_b": b, "metric": metric, "value": v, "lo": float(lo),
                             "hi": float(hi), "null_mean": nm, "null_q95": nq, "p_null": p})
    return rows
