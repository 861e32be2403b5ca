"""The causal transfer matrix: knock out the heads of role X, measure task Y, against random heads.

Per cell (role, task), with per-item performance ``p`` (higher is better) on the same items:

* ``drop_top`` = mean of ``p_plain - p_role`` with its paired bootstrap interval over items
  (:func:`analyses.inference.paired_ci`) and the paired test of role vs plain (exact McNemar for
  0/1 outcomes, sign-flip otherwise);
* ``drop_random`` = mean drop of the ``n_random`` layer-matched random sets, with the two-level
  interval over draws and items (:func:`~analyses.inference.control_ci`);
* ``excess`` = ``drop_top - drop_random``; ``relative`` = ``excess / |mean p_plain|`` (what the heat map shows);
* ``beyond_random``: the role's drop has a paired interval above 0 **and** exceeds the upper end of
  the random sets' interval (the rule of :func:`~analyses.inference.call_gain`, on drops), with at
  least ``min_draws`` random sets (the study's protocol: 5; methods.md §7).

A negative drop is a gain (ACT's calibration may help its own task). Method: docs/methods.md §7.

>>> import numpy as np
>>> base = np.ones(20); top = np.zeros(20); rnd = {f"r{s}": np.ones(20) for s in range(5)}
>>> row = cell_row("x", "y", base, top, rnd, min_draws=5, n_boot=200)
>>> row["drop_top"], row["drop_random"], row["beyond_random"], row["test"]
(1.0, 0.0, True, 'mcnemar_exact')
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import inference as inf

COLUMNS = ["role", "task", "n_items", "n_heads", "plain", "drop_top", "drop_lo", "drop_hi", "p_value", "test",
           "drop_random", "random_lo", "random_hi", "n_random", "excess", "relative", "beyond_random", "reason"]


def cell_row(role: str, task: str, plain, knocked, randoms: dict[str, np.ndarray], *, n_heads: int = 0,
             min_draws: int = 5, n_boot: int = inf.N_BOOT, seed: int = 0) -> dict:
    """One cell of the matrix (see the module docstring)."""
    plain, knocked = np.asarray(plain, np.float64), np.asarray(knocked, np.float64)
    controls = np.stack([np.asarray(v, np.float64) for v in randoms.values()]) if randoms else np.zeros((0, plain.size))
    row = {"role": role, "task": task, "n_items": int(plain.size), "n_heads": int(n_heads),
           "plain": float(plain.mean()), "n_random": int(len(controls))}
    if not len(controls):
        d = inf.paired_ci(plain, knocked, n_boot=n_boot, seed=seed)
        return row | {"drop_top": d.estimate, "drop_lo": d.lo, "drop_hi": d.hi, "beyond_random": False,
                      "reason": "no random head sets"}
    # a drop is a gain of 1 - p: the same paired differences, and 0/1 outcomes stay 0/1 (exact McNemar)
    v = inf.call_gain(1 - plain, 1 - knocked, 1 - controls, min_draws=min_draws, n_boot=n_boot, seed=seed)
    excess = v.gain.estimate - v.control.estimate
    scale = abs(row["plain"])
    return row | {"drop_top": v.gain.estimate, "drop_lo": v.gain.lo, "drop_hi": v.gain.hi, "p_value": v.p_value,
                  "test": v.test, "drop_random": v.control.estimate, "random_lo": v.control.lo,
                  "random_hi": v.control.hi, "excess": excess,
                  "relative": excess / scale if scale > 0 else math.nan, "beyond_random": bool(v.is_gain),
                  "reason": v.reason.replace("change", "drop").replace("gain", "drop")}


def transfer_table(outcomes: dict[tuple[str, str, str], np.ndarray], roles: dict, tasks: list[str], *,
                   min_draws: int = 5, n_boot: int = inf.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Every cell: ``outcomes[(role, task, condition)]`` per item, condition ``plain``/``top``/``r<seed>``
    (``plain`` under the role ``none``); ``roles``: name -> :class:`~.knockouts.Role`."""
    rows = []
    for name, role in roles.items():
        for task in tasks:
            plain = outcomes[("none", task, "plain")]
            rnd = {c: v for (r, t, c), v in outcomes.items() if r == name and t == task and c.startswith("r")}
            rows.append(cell_row(name, task, plain, outcomes[(name, task, "top")], rnd, n_heads=len(role.heads),
                                 min_draws=min_draws, n_boot=n_boot, seed=seed))
    return pd.DataFrame(rows, columns=COLUMNS)


def head_cells(table: pd.DataFrame, outcomes: pd.DataFrame, sets: dict[str, dict[str, tuple]], head) -> pd.DataFrame:
    """The cells ``head`` takes part in, as one of a role's heads (``top``) or of a random set (``r<seed>``):
    that set's own drop (paired interval over items) beside the role's drop and verdict."""
    cols = ["role", "condition", "task", "set_drop", "set_lo", "set_hi", "drop_top", "drop_random", "beyond_random"]
    if not len(table) or not len(outcomes):
        return pd.DataFrame(columns=cols)
    by = {k: g.sort_values("item")["value"].to_numpy() for k, g in outcomes.groupby(["role", "task", "condition"])}
    rows = []
    for role, conds in sets.items():
        for cond, heads in conds.items():
            if head not in heads:
                continue
            for r in table[table["role"] == role].itertuples():
                d = inf.paired_ci(by[("none", r.task, "plain")], by[(role, r.task, cond)], n_boot=1000)
                rows.append({"role": role, "condition": cond, "task": r.task, "set_drop": d.estimate, "set_lo": d.lo,
                             "set_hi": d.hi, "drop_top": r.drop_top, "drop_random": r.drop_random,
                             "beyond_random": bool(r.beyond_random)})
    return pd.DataFrame(rows, columns=cols)
