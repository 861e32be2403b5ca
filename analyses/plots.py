"""The one layer x head heat map every result draws (hover and click name the head).

Layer 0 is on top, query heads left to right; each cell carries ``[layer, head]`` as customdata,
so a click on any result's grid selects that head in the dashboard, and the hover shows the head
(``L3H1``) and its value. Columns may be reordered (e.g. grouped by KV head) with ``order``.

:func:`finish` makes every head grid of a figure the same everywhere (the dashboard and the CLI's
figure files call it with the model's :class:`~probe.heads.HeadLayout`): columns labelled and
separated by KV group (``kv0:h0 kv0:h1 | kv1:h2``), layer 0 on top, and an invisible marker on
every cell. Plotly heat maps emit no selection events, markers do: the markers carry the hover
(head id, value, extra lines) and make a click select the cell's head.

>>> import numpy as np
>>> from probe.heads import HeadLayout
>>> fig = head_map(np.arange(6.0).reshape(2, 3), "demo", "score")
>>> fig.data[0].customdata[1][2].tolist()[:3], fig.layout.yaxis.autorange
([1, 2, 'L1H2'], 'reversed')
>>> fig = finish(head_map(np.arange(8.0).reshape(2, 4), "demo", "score"), HeadLayout(2, 4, 2))
>>> list(fig.data[0].x), fig.data[1].customdata[6][:3], fig.data[1].customdata[6][4]
(['kv0:h0', 'kv0:h1', 'kv1:h2', 'kv1:h3'], [1, 2, 'L1H2'], '6')
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from probe.heads import HeadId, HeadLayout

GRID = "headwise:heads"              # ``meta`` of a head-grid heat-map trace
OVERLAY = "headwise:cells"           # ``meta`` of the click markers over a heat map
MAX_MARKERS_SVG = 4096               # more cells than this: WebGL markers (plotly's SVG gets slow)


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
                      texttemplate=None if text is None else "%{text}", meta=GRID)


# ----------------------------------------------------------------------------- one grid everywhere

def kv_label(layout: HeadLayout, head: int) -> str:
    return f"kv{layout.kv_group(head)}:h{head}"


def finish(fig: go.Figure, layout: HeadLayout | None = None) -> go.Figure:
    """Every head grid of ``fig``: KV-grouped labels and separators (when ``layout`` fits it), layer 0
    on top, and click/hover markers. Idempotent; other traces are left as they are."""
    grids = [(i, t) for i, t in enumerate(fig.data) if t.meta == GRID]
    if not grids or any(t.meta == OVERLAY for t in fig.data):
        return fig
    for _, trace in grids:
        cells = np.asarray(trace.customdata, dtype=object)
        heads = [int(c[1]) for c in cells[0]]
        layers = [int(c[0]) for c in cells[:, 0]]
        fits = layout is not None and max(heads) < layout.n_heads and max(layers) < layout.n_layers
        if fits:
            trace.x = [kv_label(layout, h) for h in heads]
            _separators(fig, trace, [layout.kv_group(h) for h in heads])
        _reverse_layers(fig, trace, layers)
        values = np.asarray(trace.z, dtype=float)
        shown = np.vectorize(lambda v: "–" if not np.isfinite(v) else format(v, ".4g"), otypes=[object])(values)
        data = np.concatenate([cells, shown[..., None]], axis=-1)
        fig.add_trace(click_markers(np.repeat([list(trace.x)], len(layers), 0), np.repeat(np.array(layers)[:, None],
                                    len(heads), 1), data, "<b>%{customdata[2]}</b> %{customdata[4]}%{customdata[3]}",
                                    xaxis=trace.xaxis, yaxis=trace.yaxis))
        trace.hoverinfo = "skip"
        trace.hovertemplate = None
    if layout is not None and layout.n_kv_heads < layout.n_heads:
        for _, trace in grids:
            axis = "xaxis" + (trace.xaxis or "x")[1:]
            if fig.layout[axis].title.text in (None, "query head"):
                fig.layout[axis].title.text = "query head (grouped by KV head)"
    return fig.update_layout(hoverdistance=-1)


def click_markers(x, y, customdata, hovertemplate: str, *, xaxis=None, yaxis=None):
    """Invisible markers at cell centres ``x, y`` (any shape) carrying ``customdata``: hover and click targets."""
    x, y = np.asarray(x, dtype=object).ravel(), np.asarray(y, dtype=object).ravel()
    cd = np.asarray(customdata, dtype=object).reshape(len(x), -1)
    kind = go.Scattergl if len(x) > MAX_MARKERS_SVG else go.Scatter
    hidden = {"marker": {"opacity": 0}}
    return kind(x=list(x), y=list(y), customdata=cd.tolist(), mode="markers", showlegend=False, meta=OVERLAY,
                marker={"opacity": 0, "size": 14, "symbol": "square"}, selected=hidden, unselected=hidden,
                hovertemplate=hovertemplate + "<extra></extra>", xaxis=xaxis, yaxis=yaxis)


def _separators(fig: go.Figure, trace, groups: list[int]) -> None:
    """White vertical lines between KV groups, on the trace's own axes."""
    xref, yref = trace.xaxis or "x", trace.yaxis or "y"
    y_domain = "y domain" if yref == "y" else f"{yref} domain"
    for j in range(1, len(groups)):
        if groups[j] != groups[j - 1]:
            fig.add_shape(type="line", x0=j - 0.5, x1=j - 0.5, y0=0, y1=1, xref=xref, yref=y_domain,
                          line={"color": "white", "width": 2})


def _reverse_layers(fig: go.Figure, trace, layers: list[int]) -> None:
    """Layer 0 on top, ticks on whole layers only (at most ~16 labels)."""
    axis = "yaxis" + (trace.yaxis or "y")[1:]
    step = max(1, -(-len(layers) // 16))
    fig.layout[axis].update(autorange="reversed", tickmode="array", tickvals=layers[::step],
                            ticktext=[str(layer) for layer in layers[::step]])


def mark_head(fig: go.Figure, head: HeadId) -> go.Figure:
    """Outline ``head``'s cell on every head grid of ``fig`` that has it."""
    for trace in fig.data:
        if trace.meta != GRID:
            continue
        cells = np.asarray(trace.customdata, dtype=object)
        cols = [j for j, c in enumerate(cells[0]) if int(c[1]) == head.head]
        rows = [int(c[0]) for c in cells[:, 0]]
        if cols and head.layer in rows:
            fig.add_shape(type="rect", x0=cols[0] - 0.5, x1=cols[0] + 0.5, y0=head.layer - 0.5, y1=head.layer + 0.5,
                          xref=trace.xaxis or "x", yref=trace.yaxis or "y", line={"color": "red", "width": 3})
    return fig


def has_head_grid(fig: go.Figure) -> bool:
    return any(t.meta == GRID for t in fig.data)


def clicked_head(event) -> HeadId | None:
    """The head of the cell a plotly selection event points at (customdata ``[layer, head, ...]``)."""
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    cd = points[0].get("customdata") if points else None
    return HeadId(int(cd[0]), int(cd[1])) if isinstance(cd, (list, tuple)) and len(cd) >= 2 else None
