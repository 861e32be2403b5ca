"""Intervals for the retrieval headlines: head sparsity and top-K vs random-K masking (docs/methods.md §1).

* :func:`sparsity_ci`: the fraction of heads scoring above the threshold, with a bootstrap over
  the answered samples (samples resampled, head scores recomputed, fraction recounted).
* :func:`masking_table`: NIAH success per condition with a Wilson interval over grid cells, and
  for every random-K seed (and all seeds pooled) the paired difference to top-K over the *same*
  cells: paired bootstrap interval and exact McNemar p-value.
* :func:`success_by`: unmasked NIAH success per context length (or depth) with a Wilson interval
  over the samples of that length (a small model may answer short contexts and fail long ones).

>>> import pandas as pd
>>> m = pd.DataFrame({"needle": ["a"] * 4, "length": [1, 2] * 2, "depth": [0, 0, 0, 0],
...                   "condition": ["top", "top", "random0", "random0"], "success": [False, False, True, True]})
>>> t = masking_table(m)
>>> float(t.set_index("condition").loc["random0", "d_vs_top"])
1.0
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from probe.errors import InputError

from .. import inference as inf

CELL = ["needle", "length", "depth"]


def sparsity_ci(events, success, threshold: float = 0.1, *, n_boot: int = 1000, seed: int = 0) -> inf.Interval:
    """Fraction of heads with score > ``threshold``; ``events [samples, L, H]``, ``success [samples]``.

    ``n`` is the number of answered samples (the ones that count for the score).
    """
    ev = np.asarray(events, np.float64)
    ok = np.asarray(success, bool)
    ev = ev[ok]
    if not len(ev):
        raise InputError("no answered sample: every head score is 0 and sparsity is undefined")
    frac = lambda e: float((e.mean(0) > threshold).mean())  # noqa: E731
    lo, hi = inf.bootstrap(lambda i: frac(ev[i]), len(ev), n_boot=n_boot, seed=seed)
    return inf.Interval(frac(ev), lo, hi, int(len(ev)))


def masking_table(masking: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Rows per condition: success rate + Wilson interval (n = cells); vs top-K: paired d, interval, McNemar p."""
    if masking.empty or "top" not in set(masking["condition"]):
        raise InputError("no top-K masking runs to compare with: run the masking experiment (mask=True)")
    wide = masking.pivot_table(index=CELL, columns="condition", values="success", aggfunc="first").astype(float)
    rows = []
    conds = [c for c in masking["condition"].unique()]
    randoms = [c for c in conds if str(c).startswith("random")]
    if randoms:
        wide["random (pooled)"] = wide[randoms].mean(1)
    for c in conds + (["random (pooled)"] if randoms else []):
        x = wide[c].dropna()
        row = {"condition": c, "n_cells": int(len(x)), "success": float(x.mean())}
        if c != "random (pooled)":
            w = inf.wilson(int(x.sum()), len(x))
            row |= {"lo": w.lo, "hi": w.hi}
        if c != "top":
            pair = wide[[c, "top"]].dropna()
            d = inf.paired_ci(pair[c], pair["top"], n_boot=n_boot, seed=seed)
            row |= {"d_vs_top": d.estimate, "d_lo": d.lo, "d_hi": d.hi}
            binary = np.isin(pair.to_numpy(), (0.0, 1.0)).all()
            row["p_vs_top"] = (inf.mcnemar_exact(pair[c], pair["top"]) if binary
                               else inf.sign_flip_test(pair[c], pair["top"], seed=seed))
        rows.append(row)
    return pd.DataFrame(rows)


def success_by(samples: pd.DataFrame, by: str = "length") -> pd.DataFrame:
    """Rows per value of ``by`` (``length``, ``depth`` or ``needle``): n samples, successes, rate, Wilson interval."""
    if by not in CELL:
        raise InputError(f"success_by: by={by!r} is not a grid column; use one of {CELL}")
    if samples.empty:
        raise InputError("no NIAH samples: run the samples stage first")
    rows = []
    for key, g in samples.groupby(by, sort=True):
        k, n = int(g["success"].astype(bool).sum()), int(len(g))
        w = inf.wilson(k, n)
        rows.append({by: key, "n": n, "k": k, "success": w.estimate, "lo": w.lo, "hi": w.hi})
    return pd.DataFrame(rows)
