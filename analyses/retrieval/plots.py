"""Plotly figures for the retrieval result (never Streamlit)."""
from __future__ import annotations

import plotly.graph_objects as go


def plot_heads(res):
    """Layer x head heat map of retrieval scores."""
    L, H = res.scores.shape
    fig = go.Figure(go.Heatmap(z=res.scores, x=[f"H{h}" for h in range(H)], y=list(range(L)),
                               colorscale="Viridis", colorbar={"title": "score"}))
    fig.update_layout(title=f"Retrieval scores ({res.model_id}; {res.fraction_above():.1%} heads > {res.threshold})",
                      xaxis_title="query head", yaxis_title="layer")
    return fig


def plot_niah(res, condition: str = "none"):
    """NIAH success (mean over needles) over context length x depth for one condition."""
    tab = res.success_table()
    tab = tab[tab["condition"] == condition]
    piv = tab.pivot(index="depth", columns="length", values="success")
    fig = go.Figure(go.Heatmap(z=piv.values, x=[str(c) for c in piv.columns], y=[f"{d:g}%" for d in piv.index],
                               zmin=0, zmax=1, colorscale="RdYlGn", colorbar={"title": "success"}))
    fig.update_layout(title=f"NIAH success, masking: {condition}", xaxis_title="context length (tokens)",
                      yaxis_title="needle depth")
    return fig
