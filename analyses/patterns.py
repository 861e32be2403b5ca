"""Whole-pattern views of one layer's heads for long contexts, pooled as the rows stream by.

A head's pattern over ``T`` tokens is ``T x T``; at 8k tokens that is 64M cells per head, far too
many to keep or to draw. Instead we attach a :func:`probe.tap` observer to one layer: the
attention function hands it each chunk of query rows (``probs[B, H, c, K]``) and the observer
pools the chunk into ``block x block`` cells at once (block-max shows sharp retrieval/sink
lines, block-mean the mass), so memory is ``heads x cells x cells`` regardless of ``T``. A
second observer keeps an exact token-level window (rows ``q0:q1``, keys ``k0:k1``) for zooming.
This is a view helper in the spirit of attention-pattern plots (Vig, "A Multiscale
Visualization of Attention in the Transformer Model", 2019; Clark et al., "What Does BERT
Look At?", 2019), adapted to streaming.

>>> from probe import load_model
>>> m = load_model("tiny-llama")
>>> p = pooled_pattern(m, "hello world, hello again", layer=1, cells=8)
>>> p.pooled.shape, p.block
((4, 8, 8), 3)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from probe.shapes import PatternWindow

from probe.atomic import read_tensors, write_tensors
from probe.errors import InputError
from probe.heads import HeadId
from probe.runtime import tap

FORMAT = "headwise.pooled_pattern"
MAX_CELLS = 256  # never send more than MAX_CELLS x MAX_CELLS cells to a browser


class _BlockPooler:
    """Tap observer: pools each streamed chunk of one layer's rows into ``[H, n, n]`` blocks."""

    def __init__(self, layer: int, n_tokens: int, block: int, mode: str, n_heads: int):
        self.layers, self.layer, self.block, self.mode = {layer}, layer, block, mode
        self.n = math.ceil(n_tokens / block)
        self.acc = torch.zeros(n_heads, self.n, self.n, device="cpu")  # max, or sum for mean (host)

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None:
        p = probs[0].float().cpu()                                # (H, c, K)
        H, c, K = p.shape
        b, n = self.block, self.n
        p = torch.nn.functional.pad(p, (0, n * b - K)).view(H, c, n, b)
        cols = p.amax(-1) if self.mode == "max" else p.sum(-1)   # (H, c, n)
        rows = (q_pos.cpu() // b).long()                          # (c,)
        idx = rows.view(1, c, 1).expand(H, c, n)
        reduce = "amax" if self.mode == "max" else "sum"
        self.acc.scatter_reduce_(1, idx, cols, reduce=reduce, include_self=True)

    def result(self, n_tokens: int) -> np.ndarray:
        if self.mode == "max":
            return self.acc.numpy()
        size = torch.full((self.n,), float(self.block), device="cpu")
        size[-1] = n_tokens - self.block * (self.n - 1)           # the last block may be short
        return (self.acc / (size[:, None] * size[None, :])).numpy()


class _Window:
    """Tap observer: keeps the exact pattern rows ``q0:q1`` x keys ``k0:k1`` of one layer."""

    def __init__(self, layer: int, q: tuple[int, int], k: tuple[int, int], n_heads: int):
        self.layers, self.q, self.k = {layer}, q, k
        self.out = torch.zeros(n_heads, q[1] - q[0], k[1] - k[0], device="cpu")

    def on_probs(self, layer: int, q_pos: torch.Tensor, probs: torch.Tensor) -> None:
        keep = (q_pos >= self.q[0]) & (q_pos < self.q[1])
        if keep.any():
            rows = (q_pos[keep] - self.q[0]).cpu()
            self.out[:, rows] = probs[0][:, keep.to(probs.device), self.k[0]:self.k[1]].float().cpu()


@dataclass(frozen=True, eq=False)
class PooledPattern:
    """Pooled patterns ``pooled[head, query_block, key_block]`` of every head of one layer."""

    model_id: str
    layer: int
    n_tokens: int
    block: int
    mode: str
    pooled: PatternWindow
    tokens: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def edges(self) -> list[int]:
        """First token position of each block."""
        return list(range(0, self.n_tokens, self.block))

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per head, query block and key block (start positions)."""
        H, n, _ = self.pooled.shape
        h, q, k = np.meshgrid(np.arange(H), np.arange(n), np.arange(n), indexing="ij")
        return pd.DataFrame({"layer": self.layer, "head": h.ravel(), "query_start": q.ravel() * self.block,
                             "key_start": k.ravel() * self.block, "metric": f"block_{self.mode}",
                             "value": self.pooled.ravel()})

    def plot(self, head: int) -> go.Figure:
        """The pooled map of ``head``; each cell carries ``[query start, key start]`` (a click centres a zoom)."""
        from .plots import click_markers

        edges = self.edges()
        fig = go.Figure(go.Heatmap(z=self.pooled[head], x=edges, y=edges, colorscale="Viridis", hoverinfo="skip"))
        q, k = np.meshgrid(edges, edges, indexing="ij")
        z = self.pooled[head]
        data = np.stack([q, k, np.vectorize(lambda v: f"{v:.3f}", otypes=[object])(z)], -1)
        fig.add_trace(click_markers(k, q, data, "query %{customdata[0]}+ · key %{customdata[1]}+<br>%{customdata[2]}"))
        fig.update_layout(title=f"{HeadId(self.layer, head)}: block-{self.mode} over {self.n_tokens} tokens "
                                f"({self.block} tokens per cell)", xaxis_title="key position",
                          yaxis_title="query position", yaxis_autorange="reversed", height=560, hoverdistance=-1)
        return fig

    def save(self, path: str | Path) -> Path:
        meta = {"format": FORMAT, "version": 1, "model_id": self.model_id, "layer": self.layer,
                "n_tokens": self.n_tokens, "block": self.block, "mode": self.mode,
                "tokens": list(self.tokens), "meta": json.loads(json.dumps(self.meta))}
        return write_tensors(path, {"pooled": torch.from_numpy(np.ascontiguousarray(self.pooled))}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "PooledPattern":
        t, m = read_tensors(path, FORMAT)
        return cls(model_id=m["model_id"], layer=m["layer"], n_tokens=m["n_tokens"], block=m["block"],
                   mode=m["mode"], pooled=t["pooled"].numpy(), tokens=tuple(m["tokens"]), meta=m["meta"])


def _ids(model, text) -> torch.Tensor:
    return model.encode(text) if isinstance(text, str) else text


def _run(model, ids, observer) -> None:
    with tap(model, observer), torch.no_grad():
        model.hf(ids.to(model.hf.device), use_cache=False)


def pooled_pattern(model, text, *, layer: int, cells: int = MAX_CELLS, mode: str = "max") -> PooledPattern:
    """Pool every head of ``layer`` into at most ``cells x cells`` blocks, chunk-wise (no ``T x T``)."""
    if mode not in ("max", "mean"):
        raise InputError(f"pooling mode must be 'max' or 'mean', got {mode!r}")
    if not 1 <= cells <= MAX_CELLS:
        raise InputError(f"cells must be in 1..{MAX_CELLS} (what a browser can draw), got {cells}")
    model.layout.check_layer(layer)
    ids = _ids(model, text)
    T = ids.shape[1]
    block = math.ceil(T / cells)
    pooler = _BlockPooler(layer, T, block, mode, model.n_heads)
    _run(model, ids, pooler)
    return PooledPattern(model.model_id, layer, T, block, mode, pooler.result(T),
                         tuple(model.str_tokens(ids)), {"weights_hash": model.weights_hash})


def pattern_window(model, text, *, layer: int, queries: tuple[int, int], keys: tuple[int, int]) -> PatternWindow:
    """Exact pattern ``[head, q0:q1, k0:k1]`` of ``layer`` (at most MAX_CELLS per side), streamed."""
    model.layout.check_layer(layer)
    ids = _ids(model, text)
    T = ids.shape[1]
    (q0, q1), (k0, k1) = queries, keys
    if not (0 <= q0 < q1 <= T and 0 <= k0 < k1 <= T):
        raise InputError(f"window queries {queries}, keys {keys} must lie inside 0..{T} with start < stop")
    if q1 - q0 > MAX_CELLS or k1 - k0 > MAX_CELLS:
        raise InputError(f"a window may span at most {MAX_CELLS} tokens per side; zoom in further")
    win = _Window(layer, (q0, q1), (k0, k1), model.n_heads)
    _run(model, ids, win)
    return win.out.numpy()


def window_figure(window: np.ndarray, tokens, queries: tuple[int, int], keys: tuple[int, int],
                  title: str) -> go.Figure:
    """Token-labelled heat map of one head's window ``[q, k]`` (labels: ``position:token``)."""
    ylab = [f"{i}:{tokens[i]!r}"[:24] for i in range(*queries)]
    xlab = [f"{i}:{tokens[i]!r}"[:24] for i in range(*keys)]
    fig = go.Figure(go.Heatmap(z=window, x=xlab, y=ylab, colorscale="Viridis",
                               hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed",
                      height=max(420, min(900, 14 * len(ylab) + 160)))
    return fig
