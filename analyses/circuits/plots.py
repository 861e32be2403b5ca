"""Plotly figures of the circuits result (never Streamlit).

Methods: docs/methods.md §3.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..plots import head_map, head_trace


def task_map(t, method: str = "exact"):
    """Layer x head normalised patching score of one task; dots mark the circuit."""
    s = t.scores(method)
    dots = np.where(t.membership() > 0, "●", "")
    lim = float(np.nanmax(np.abs(s))) or 1.0
    return head_map(s, f"{t.task}: normalised patching score ({method}; ● circuit)", "score", colorscale="RdBu_r",
                    zmid=0, zmin=-lim, zmax=lim, text=dots)


def overlap(res, metric: str = "jaccard"):
    """Task x task overlap of the circuits (``jaccard`` or ``overlap_coefficient``)."""
    m = res.overlap_matrix(metric)
    fig = go.Figure(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), zmin=0, zmax=1, colorscale="Viridis",
                               text=m.round(2).values, texttemplate="%{text}", colorbar={"title": metric}))
    return fig.update_layout(title=f"Circuit overlap across tasks ({metric}; {res.model_id})", height=420,
                             yaxis_autorange="reversed")


def overview(res, metric: str = "jaccard"):
    """The overlap matrix above every task's layer x head score map."""
    n = max(len(res.tasks), 1)
    fig = make_subplots(rows=2, cols=n, specs=[[{"colspan": n}] + [None] * (n - 1), [{}] * n],
                        subplot_titles=[f"overlap ({metric})"] + [t.task for t in res.tasks])
    fig.add_trace(overlap(res, metric).data[0].update(showscale=False), row=1, col=1)
    for i, t in enumerate(res.tasks):
        fig.add_trace(head_trace(t.scores("exact"), colorscale="RdBu_r", zmid=0), row=2, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(height=650, title=f"Circuits across tasks ({res.model_id})")
