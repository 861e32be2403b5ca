"""Plotly figures of the retrieval result (never Streamlit).

Methods: docs/methods.md §1.
"""
from __future__ import annotations

import plotly.graph_objects as go

from ..plots import head_map


def plot_heads(res):
    """Layer x head retrieval scores (click a cell to select the head)."""
    return head_map(res.scores, f"Retrieval scores ({res.model_id}; {res.fraction_above():.1%} heads > "
                                f"{res.threshold})", "score")


def plot_grouped(res):
    """GQA view: layer x KV head, the max score over the query heads sharing that KV head."""
    g = res.grouped()
    piv = g.pivot(index="layer", columns="kv_head", values="max_score")
    text = g.pivot(index="layer", columns="kv_head", values="n_retrieval").astype(str).values
    fig = go.Figure(go.Heatmap(z=piv.values, x=[f"KV{k}" for k in piv.columns], y=list(piv.index), text=text,
                               texttemplate="%{text}", colorscale="Viridis", colorbar={"title": "max score"}))
    fig.update_layout(title="Retrieval scores by KV group (max over its query heads; text: heads > threshold)",
                      xaxis_title="KV head", yaxis_title="layer", yaxis_autorange="reversed")
    return fig


def plot_niah(res, condition: str = "none"):
    """NIAH success (mean over needles; ``"random"``: also over seeds) over length x depth."""
    tab = res.success_table(pool_random=condition == "random")
    tab = tab[tab["condition"] == condition]
    piv = tab.pivot(index="depth", columns="length", values="success")
    fig = go.Figure(go.Heatmap(z=piv.values, x=[str(c) for c in piv.columns], y=[f"{d:g}%" for d in piv.index],
                               zmin=0, zmax=1, colorscale="RdYlGn", colorbar={"title": "success"}))
    fig.update_layout(title=f"NIAH success, masked heads: {condition}", xaxis_title="context length (tokens)",
                      yaxis_title="needle depth")
    return fig


def plot_masking(res):
    """NIAH success per condition on the masking cells (unmasked, top-K, each random-K seed), Wilson intervals."""
    t = res.masking_table()
    t = t[t["condition"] != "random (pooled)"]
    fig = go.Figure(go.Bar(x=t["condition"], y=t["success"], text=[f"{v:.0%}" for v in t["success"]],
                           error_y={"type": "data", "symmetric": False, "array": t["hi"] - t["success"],
                                    "arrayminus": t["success"] - t["lo"]}))
    fig.update_layout(title=f"NIAH success with K={res.meta.get('k')} heads masked during decoding "
                            f"(n = {int(t['n_cells'].max())} cells; 95% Wilson intervals)",
                      yaxis_title="success rate", yaxis_range=[0, 1.05], xaxis_title="masked heads")
    return fig
