"""Plotly figures of the grounding result (never Streamlit).

Methods: docs/methods.md §5.
"""
from __future__ import annotations

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

from ..plots import head_map


def heads(res):
    """Layer x head map of detector coefficients (red: looking back predicts grounded)."""
    w = res.head_weights
    lim = float(np.abs(w).max()) or 1.0
    s = res.stats
    ci = s.get("auroc_ci", [np.nan, np.nan])
    title = (f"Lookback Lens on {res.model_id}: held-out AUROC {s.get('auroc', float('nan')):.3f} "
             f"[{ci[0]:.3f}, {ci[1]:.3f}] vs mean-LR {s.get('baseline_auroc', float('nan')):.3f};"
             f" within template {s.get('w_auroc', float('nan')):.3f}")
    return head_map(w, title, "coef", colorscale="RdBu_r", zmin=-lim, zmax=lim).update_layout(height=700)


def roc(res):
    """Held-out ROC of the detector and of the mean-ratio baseline."""
    fig = px.line(res.roc, x="fpr", y="tpr", color="scorer", title="Held-out ROC: grounded vs not grounded answers")
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "gray"})
    return fig.update_layout(xaxis_title="false positive rate", yaxis_title="true positive rate", height=450)


def mitigation(res):
    """Grounded and contradicted rate per mitigation condition (before = greedy)."""
    mit = res.mitigation
    fig = go.Figure([go.Bar(name="grounded", x=mit["condition"], y=mit["grounded_rate"]),
                     go.Bar(name="contradicted", x=mit["condition"], y=mit["contradicted_rate"])])
    n = int(mit["n"].iloc[0]) if len(mit) else 0
    return fig.update_layout(barmode="group", title=f"Mitigation on {n} held-out items (before = greedy)",
                             yaxis_title="rate", yaxis_range=[0, 1], height=420)


def token_view(tokens: list[str], scores):
    """One coloured cell per generated token; the hover shows P(grounded)."""
    fig = go.Figure(go.Heatmap(z=[list(scores)], text=[tokens], texttemplate="%{text}", zmin=0, zmax=1,
                               colorscale="RdYlGn", colorbar={"title": "P(grounded)"}))
    return fig.update_layout(height=200, yaxis={"visible": False}, xaxis={"title": "generated token"})
