"""Plotly views of probe records shared by notebooks and the dashboard (no Streamlit here).

``head_grid`` draws a ``layer x head`` map of any per-head metric with heads grouped by their
shared KV head; ``head_heatmap`` draws one head's pattern with token labels.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .plots import head_map

from probe.heads import HeadId, kv_group
from probe.records import AttentionRecord
from probe.stats import HeadStats


def head_metric(stats: HeadStats, metric: str) -> np.ndarray:
    """``[layer, head]`` mean over rows of a metric of :meth:`HeadStats.to_frame` (e.g. ``"mass:first"``)."""
    df = stats.to_frame()
    df = df[df.metric == metric]
    if df.empty:
        from probe.errors import InputError

        raise InputError(f"no metric {metric!r}; available: {sorted(stats.to_frame().metric.unique())}")
    return df.pivot(index="layer", columns="head", values="value").to_numpy()


def head_grid(stats: HeadStats, metric: str = "entropy", n_kv_heads: int | None = None) -> go.Figure:
    """Layer x head heat map of ``metric``, columns ordered and labelled by KV group."""
    values = head_metric(stats, metric)
    n_heads = values.shape[1]
    n_kv = n_kv_heads or n_heads
    order = sorted(range(n_heads), key=lambda h: (kv_group(h, n_heads, n_kv), h))
    fig = head_map(values, f"{metric} per head (columns grouped by KV head)", metric, order=order, layers=stats.layers,
                   x_labels=[f"kv{kv_group(h, n_heads, n_kv)}:h{h}" for h in order])
    return fig.update_layout(xaxis_title="KV group : head")


def head_heatmap(record: AttentionRecord, head: HeadId | tuple[int, int]) -> go.Figure:
    """One head's ``[query, key]`` pattern with token labels."""
    head = HeadId(*head)
    pat = record.pattern(head).numpy()
    toks = [f"{i}:{t!r}"[:24] for i, t in enumerate(record.tokens)]
    fig = go.Figure(go.Heatmap(z=pat, x=toks, y=toks, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"{head} attention pattern", xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", height=520)
    return fig


def open_record(path) -> AttentionRecord | HeadStats:
    """A file of ``headwise capture`` (:class:`AttentionRecord`) or ``headwise stats`` (:class:`HeadStats`),
    told apart by its format tag and loaded with that type's checks."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from probe import records, stats
    from probe.errors import CorruptFileError

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = json.loads((f.metadata() or {}).get("headwise") or "{}").get("format")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a safetensors file written by headwise ({exc})") from exc
    kinds = {records.FORMAT: AttentionRecord, stats.FORMAT: HeadStats}
    if fmt not in kinds:
        raise CorruptFileError(f"{path} holds {fmt!r}, not a capture record or statistics file: open the output of "
                               "`headwise capture --out` or `headwise stats --out`")
    return kinds[fmt].load(path)


def stats_rows(stats: HeadStats, head: HeadId | tuple[int, int]) -> go.Figure:
    """One head's entropy and max attention query row by query row (a ``headwise stats`` file)."""
    head = HeadId(*head)
    li = stats.layer_index(head.layer)
    pos = stats.query_pos.numpy()
    fig = go.Figure([go.Scatter(x=pos, y=stats.entropy[li, head.head].numpy(), name="entropy (nats)"),
                     go.Scatter(x=pos, y=stats.max_prob[li, head.head].numpy(), name="max attention", yaxis="y2")])
    return fig.update_layout(title=f"{head} row by row ({len(pos)} query rows)", xaxis_title="query position",
                             yaxis_title="entropy (nats)", yaxis2={"title": "max attention", "overlaying": "y",
                                                                   "side": "right", "range": [0, 1]}, height=380)
