"""Plotly figures for :class:`SimilarityResult` (no Streamlit here).

Methods: docs/methods.md §4.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probe.heads import HeadId

from ..plots import head_trace


def figure(r, kind: str = "layers", metric: str = "cos"):
    if kind == "layers":
        if metric not in ("cos", "js"):
            from probe.errors import InputError
            raise InputError(f"metric must be 'cos' or 'js', not {metric!r}")
        m = r.layer_cos if metric == "cos" else r.layer_js
        title = "layer x layer " + ("cosine (head-averaged maps)" if metric == "cos" else "row-wise JS divergence (bits)")
        fig = go.Figure(go.Heatmap(z=m, colorscale="Viridis", colorbar={"title": metric}))
        return fig.update_layout(title=f"{r.model_id}: {title}", xaxis_title="layer", yaxis_title="layer",
                                 yaxis_autorange="reversed")
    if kind == "heads":
        labels = [str(HeadId(i // r.n_heads, i % r.n_heads)) for i in range(r.n_layers * r.n_heads)]
        fig = go.Figure(go.Heatmap(z=r.head_cos, x=labels, y=labels, colorscale="Viridis"))
        return fig.update_layout(title=f"{r.model_id}: head x head cosine", yaxis_autorange="reversed")
    if kind == "clusters":
        return _clusters(r)
    return _echo(r)


def _clusters(r):
    L, H = r.n_layers, r.n_heads
    order = np.argsort(r.families, kind="stable")
    labels = [f"{HeadId(i // H, i % H)} (f{r.families[i]})" for i in order]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=("head families (layer x head)", "head cosine, ordered by family"))
    fig.add_trace(head_trace(r.families.reshape(L, H), colorscale="Turbo"), 1, 1)   # click a cell: select the head
    fig.add_trace(go.Heatmap(z=r.head_cos[np.ix_(order, order)], x=labels, y=labels, colorscale="Viridis"), 1, 2)
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(title=f"{r.model_id}: head families (agglomerative, average linkage on 1 - cosine)")


def _echo(r):
    fig = go.Figure()
    sims = {"same": r.adjacent("same"), "matched": r.adjacent("matched")}
    for v, loss in r.echo.items():
        x = sims.get(v, r.adjacent("layer"))
        fig.add_trace(go.Scatter(x=x, y=loss, mode="markers+text", name=v, text=[str(l) for l in range(len(loss))],
                                 textposition="top center",
                                 hovertemplate="layers %{text}->+1: sim %{x:.3f}, loss +%{y:.4f}<extra>" + v + "</extra>"))
    corr = r.correlations()
    note = ", ".join(f"{k}: rho={c['rho']:.2f}" for k, c in corr.items())
    return fig.update_layout(title=f"{r.model_id}: echo loss increase vs adjacent similarity<br><sup>{note}</sup>",
                             xaxis_title="similarity of (l, l+1) (same: same-index heads; matched: matched heads; "
                                         "random: head-averaged)", yaxis_title="loss increase (nats/token)")
