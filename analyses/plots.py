"""The one layer x head heat map every result draws (hover and click name the head).

Layer 0 is on top, query heads left to right; each cell carries ``[layer, head]`` as customdata,
so a click on any result's grid selects that head in the dashboard, and the hover shows the head
(``L3H1``) and its value. Columns may be reordered (e.g. grouped by KV head) with ``order``.

>>> import numpy as np
>>> fig = head_map(np.arange(6.0).reshape(2, 3), "demo", "score")
>>> fig.data[0].customdata[1][2].tolist()[:3], fig.layout.yaxis.autorange
([1, 2, 'L1H2'], 'reversed')
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from probe.heads import HeadId


def head_cells(layers, order, extra=None) -> np.ndarray:
    """Per-cell customdata ``[layer, head, "L3H1", extra]`` of a ``[len(layers), len(order)]`` grid."""
    layers, order = list(layers), list(order)
    cells = np.empty((len(layers), len(order), 4), dtype=object)
    for i, l in enumerate(layers):
        for j, h in enumerate(order):
            cells[i, j] = [l, h, str(HeadId(l, h)), "" if extra is None else extra[i][h]]
    return cells


def head_map(z, title: str, colorbar: str, *, order=None, x_labels=None, layers=None, colorscale: str = "Viridis",
             zmid: float | None = None, zmin=None, zmax=None, text=None, extra=None) -> go.Figure:
    """Heat map of ``z [layer, head]``; ``layers``: the layer of each row (default 0..L-1); ``extra``:
    per-cell hover lines ``[row][head]`` of str."""
    fig = go.Figure(head_trace(z, colorbar, order=order, x_labels=x_labels, layers=layers, colorscale=colorscale,
                               zmid=zmid, zmin=zmin, zmax=zmax, text=text, extra=extra))
    fig.update_layout(title=title, xaxis_title="query head", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(360, 18 * len(fig.data[0].y) + 160))
    return fig


def head_trace(z, colorbar: str | None = None, *, order=None, x_labels=None, layers=None,
               colorscale: str = "Viridis", zmid=None, zmin=None, zmax=None, text=None, extra=None) -> go.Heatmap:
    """The heat-map trace of :func:`head_map` (for subplots)."""
    z = np.asarray(z, dtype=float)
    L, H = z.shape
    order = list(range(H)) if order is None else list(order)
    layers = list(range(L)) if layers is None else list(layers)
    return go.Heatmap(z=z[:, order], x=x_labels or [f"H{h}" for h in order], y=layers,
                      customdata=head_cells(layers, order, extra), colorscale=colorscale, zmid=zmid, zmin=zmin,
                      zmax=zmax, colorbar={"title": colorbar} if colorbar else None, showscale=colorbar is not None,
                      hovertemplate="<b>%{customdata[2]}</b> %{z:.4g}%{customdata[3]}<extra></extra>",
                      text=None if text is None else np.asarray(text, dtype=object)[:, order],
                      texttemplate=None if text is None else "%{text}")


def clicked_head(event) -> HeadId | None:
    """The head of the cell a plotly selection event points at (customdata ``[layer, head, ...]``)."""
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    cd = points[0].get("customdata") if points else None
    return HeadId(int(cd[0]), int(cd[1])) if isinstance(cd, (list, tuple)) and len(cd) >= 2 else None
