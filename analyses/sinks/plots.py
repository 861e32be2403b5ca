"""Plotly figures of the sink profile, the ACT head search and the held-out comparison (never Streamlit).

Methods: docs/methods.md §2.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..plots import head_map, head_trace


def profile_map(prof, metric: str = "mass"):
    """One layer x head map per token type of ``mass`` (attention on that type) or ``sinks`` per prompt."""
    from .profile import TOKEN_TYPES

    if metric not in ("mass", "sinks"):
        from probe.errors import InputError
        raise InputError(f"metric must be 'mass' or 'sinks', not {metric!r}")
    L = int(prof.mass["layer"].max()) + 1 if len(prof.mass) else 1
    H = int(prof.mass["head"].max()) + 1 if len(prof.mass) else 1
    scores = prof.score_maps(L, H)
    fig = make_subplots(rows=1, cols=len(TOKEN_TYPES), subplot_titles=TOKEN_TYPES, shared_yaxes=True)
    for c, ty in enumerate(TOKEN_TYPES, start=1):
        z = scores.get(f"{metric}:{ty}", 0 * next(iter(scores.values())))
        fig.add_trace(head_trace(z).update(coloraxis="coloraxis"), row=1, col=c)
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(title=f"Attention sinks by token type ({metric}; {prof.n_texts} prompts, {prof.model_id})",
                             coloraxis={"colorscale": "Viridis"})


def search_map(search, metric: str = "delta_accuracy"):
    """Layer x head change of the calibration-split score when each candidate is calibrated alone."""
    L = max(r["layer"] for r in search.candidates) + 1
    H = max(r["index"] for r in search.candidates) + 1
    z = search.score_maps(L, H)[metric]
    return head_map(z, f"ACT: {metric} per head calibrated alone ({search.task}, {search.shots}-shot; "
                       f"{len(search.selected)} kept)", metric, colorscale="RdBu", zmid=0)


def heldout_bars(search):
    """Held-out accuracy: plain, the kept heads calibrated, random heads of the same number (mean, std)."""
    f = search.figures()
    rnd = f["heldout_random_accuracy"]
    names = ["plain", f"calibrated ({f['n_selected']} heads)"] + ([f"random heads ({rnd['n']} seeds)"] if rnd["n"] else [])
    vals = [f["heldout_plain"]["accuracy"], f["heldout_calibrated"]["accuracy"]] + ([rnd["mean"]] if rnd["n"] else [])
    errs = [0, 0] + ([rnd["std"]] if rnd["n"] else [])
    fig = go.Figure(go.Bar(x=names, y=vals, error_y={"type": "data", "array": errs}, text=[f"{v:.3f}" for v in vals],
                           textposition="outside", marker_color=["#888", "#2a7", "#c84"][:len(vals)]))
    return fig.update_layout(title=f"Held-out accuracy before/after calibration ({search.task}, {search.shots}-shot)",
                             yaxis_title="accuracy", yaxis_range=[0, 1.05], height=380)
