"""Plotly figures of the study (never Streamlit): the agreement and overlap matrices, the transfer matrix,
any score per head, and the head card's figures.

Methods: docs/methods.md §7.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..plots import head_map


def _short(name: str) -> str:
    return name if len(name) <= 34 else name[:32] + "…"


def agreement_matrix(res, field: str = "value") -> go.Figure:
    """Score x score heat map of Spearman rho (``value``) or top-k Jaccard (``jaccard``), with intervals.

    Text: the estimate and its 95% interval; ``*``: q < 0.05 (rank: within-layer null; overlap:
    the layer-keeping null). Empty cells: no comparison (layer-level or categorical scores).
    """
    a = res.agreement
    names = [s.name for s in res.scores]
    n = len(names)
    z = np.full((n, n), np.nan)
    text = np.full((n, n), "", dtype=object)
    lo, hi, q = ("lo", "hi", "q_rank") if field == "value" else ("jaccard_lo", "jaccard_hi", "q_overlap")
    pos = {s: i for i, s in enumerate(names)}
    for r in a.itertuples():
        v = getattr(r, field)
        if pd.isna(v):
            continue
        i, j = pos[r.score_a], pos[r.score_b]
        ci = "" if pd.isna(getattr(r, lo)) else f"<br>[{getattr(r, lo):.2f}, {getattr(r, hi):.2f}]"
        star = "*" if getattr(r, q) < 0.05 else ""
        for x, y in ((i, j), (j, i)):
            z[x, y] = v
            text[x, y] = f"{v:.2f}{star}{ci}"
    for i in range(n):
        z[i, i], text[i, i] = (1.0 if field == "value" else np.nan), ""
    labels = [_short(s) for s in names]
    title = ("Rank agreement of per-head scores (Spearman rho; eta^2 vs the family)" if field == "value" else
             f"Top-{res.meta.get('k', '?')} overlap (Jaccard) of per-head scores")
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, texttemplate="%{text}",
                               textfont={"size": 9}, colorscale="RdBu" if field == "value" else "Viridis",
                               zmid=0 if field == "value" else None, zmin=-1 if field == "value" else 0, zmax=1,
                               colorbar={"title": "rho" if field == "value" else "Jaccard"},
                               hovertemplate="%{y}<br>%{x}<br>%{text}<extra></extra>"))
    return fig.update_layout(title=title + " (* q < 0.05)", yaxis_autorange="reversed", height=260 + 38 * n,
                             xaxis_tickangle=-40)


def transfer_matrix(res) -> go.Figure:
    """Role x task heat map of the excess drop over random heads (relative to the plain score).

    Text: the drop with its 95% interval and the random sets' mean drop; ``✓``: beyond random.
    """
    t = res.transfer
    roles, tasks = list(dict.fromkeys(t["role"])), list(dict.fromkeys(t["task"]))
    z = np.full((len(roles), len(tasks)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    for r in t.itertuples():
        i, j = roles.index(r.role), tasks.index(r.task)
        z[i, j] = r.relative
        mark = " ✓" if r.beyond_random else ""
        text[i, j] = (f"{r.drop_top:+.3g}{mark}<br>[{r.drop_lo:.2g}, {r.drop_hi:.2g}]<br>random {r.drop_random:+.2g}"
                      if not pd.isna(r.drop_random) else f"{r.drop_top:+.3g}")
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=tasks, y=roles, text=text, texttemplate="%{text}", textfont={"size": 10},
                               colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim,
                               colorbar={"title": "excess drop / plain"},
                               hovertemplate="knock out %{y}<br>task %{x}<br>%{text}<extra></extra>"))
    return fig.update_layout(title="Causal transfer: drop of each task when a role's heads are knocked out "
                                   "(✓ beyond random heads)", xaxis_title="task measured", yaxis_title="role knocked out",
                             yaxis_autorange="reversed", height=220 + 70 * len(roles))


def score_map(res, name: str) -> go.Figure:
    """One score per head (click a cell to select the head)."""
    s = res.score(name)
    return head_map(s.values, f"{res.model_id}: {name}", "score")


def card_scores(card) -> go.Figure:
    """A head's percentile rank in every score (100 = the top head)."""
    df = card.scores.dropna(subset=["percentile"])
    fig = go.Figure(go.Bar(x=df["percentile"], y=df["score"], orientation="h",
                           text=[f"{v:.3g} (rank {int(r)}/{int(n)})" for v, r, n in zip(df["value"], df["rank"], df["n"])],
                           hovertemplate="%{y}<br>%{text}<extra></extra>"))
    return fig.update_layout(title=f"{card.head}: percentile rank in every score", xaxis_title="percentile",
                             xaxis_range=[0, 100], yaxis_autorange="reversed", height=160 + 24 * len(df))


def card_cells(card) -> go.Figure:
    """The transfer cells a head takes part in (as a role's head, or in a random set)."""
    c = card.cells
    labels = [f"{r} ({cond}) -> {t}" for r, cond, t in zip(c["role"], c["condition"], c["task"])]
    fig = go.Figure(go.Bar(x=c["set_drop"], y=labels, orientation="h",
                           error_x={"type": "data", "symmetric": False, "array": (c["set_hi"] - c["set_drop"]).tolist(),
                                    "arrayminus": (c["set_drop"] - c["set_lo"]).tolist()}))
    return fig.update_layout(title=f"{card.head}: the drop of every head set it belongs to (95% intervals)",
                             xaxis_title="drop (plain - knocked out)", yaxis_autorange="reversed",
                             height=160 + 24 * max(1, len(c)))
