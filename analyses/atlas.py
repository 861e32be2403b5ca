"""Head atlas: a layer x head grid of per-head scores, heads grouped by the KV head they share.

Under grouped-query attention several query heads read the same key/value head, so their
patterns are related; ordering and labelling columns by KV group (``kv0:h0 kv0:h1 ... kv1:h3``)
makes that visible. The first scores are the streaming statistics of one prompt (mean entropy,
mean max attention, mean attention on the first token; Xiao et al., "Efficient Streaming Language
Models with Attention Sinks", 2023 for the first-token mass); later analyses add their own
columns to the same tidy frame (one row per layer, head and metric).

>>> from probe import load_model
>>> g = head_grid(load_model("tiny-llama"), "hello")
>>> sorted(g.metrics()), g.column_labels()
(['entropy', 'mass:first', 'max_prob'], ['kv0:h0', 'kv0:h1', 'kv1:h2', 'kv1:h3'])
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probe.atomic import atomic_path, read_json, write_json
from probe.errors import CorruptFileError, InputError
from probe.heads import HeadLayout
from probe.stats import KeyGroup
from probe.streaming import stream_stats

LABELS = {"entropy": "mean entropy (nats)", "max_prob": "mean max attention",
          "mass:first": "mean attention on the first token"}


@dataclass(frozen=True, eq=False)
class HeadGrid:
    """Tidy per-head scores (``layer, head, metric, value``) plus the model's head layout."""

    model_id: str
    layout: HeadLayout
    frame: pd.DataFrame
    meta: dict

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.frame["metric"]))

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def column_labels(self) -> list[str]:
        return [f"kv{self.layout.kv_group(h)}:h{h}" for h in self.layout.grouped_order()]

    def matrix(self, metric: str) -> np.ndarray:
        """``[layer, head]`` values of ``metric``, heads in KV-grouped order."""
        if metric not in self.metrics():
            raise InputError(f"no metric {metric!r}; available: {self.metrics()}")
        wide = self.frame[self.frame.metric == metric].pivot(index="layer", columns="head", values="value")
        return wide.reindex(columns=self.layout.grouped_order()).to_numpy()

    def plot(self, metric: str = "entropy") -> go.Figure:
        order, metrics = self.layout.grouped_order(), self.metrics()
        L = self.layout.n_layers
        cube = np.stack([self.matrix(m) for m in metrics], -1)                # (L, H, M)
        ids = np.array([[f"L{l}H{h}" for h in order] for l in range(L)], dtype=object)
        custom = np.concatenate([ids[..., None], cube.round(4).astype(object)], -1)
        hover = "<b>%{customdata[0]}</b> (%{x})<br>" + "<br>".join(
            f"{m}: %{{customdata[{i + 1}]}}" for i, m in enumerate(metrics)) + "<extra></extra>"
        fig = go.Figure(go.Heatmap(z=self.matrix(metric), x=self.column_labels(), y=list(range(L)),
                                   customdata=custom, hovertemplate=hover, colorscale="Viridis",
                                   colorbar={"title": metric}))
        G = self.layout.group_size
        for g in range(1, self.layout.n_kv_heads):                             # KV group separators
            fig.add_vline(x=g * G - 0.5, line_color="white", line_width=2)
        fig.update_layout(title=f"{self.model_id}: {LABELS.get(metric, metric)} per head (columns grouped by KV head)",
                          xaxis_title="query head (grouped by KV head)", yaxis_title="layer",
                          yaxis_autorange="reversed", height=max(360, 22 * L + 160))
        return fig

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "head_grid.parquet") as tmp:
            self.frame.to_parquet(tmp)
        lay = {"n_layers": self.layout.n_layers, "n_heads": self.layout.n_heads, "n_kv_heads": self.layout.n_kv_heads}
        write_json(folder / "head_grid.json", {"format": "headwise.head_grid", "model_id": self.model_id,
                                               "layout": lay, "meta": json.loads(json.dumps(self.meta))})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "HeadGrid":
        folder = Path(folder)
        summary = read_json(folder / "head_grid.json")
        if summary.get("format") != "headwise.head_grid":
            raise CorruptFileError(f"{folder}: not a head-grid result (rerun the head grid to rewrite it)")
        return cls(summary["model_id"], HeadLayout(**summary["layout"]),
                   pd.read_parquet(folder / "head_grid.parquet"), summary["meta"])


def head_grid(model, text, *, layers=None) -> HeadGrid:
    """Per-head mean entropy, max attention and first-token mass of ``text``, streamed (long prompts OK)."""
    stats = stream_stats(model, text, groups=[KeyGroup("first", 0, 1)], layers=layers, verbose=False)
    return HeadGrid(model.model_id, model.layout, stats.to_frame(),
                    {"n_tokens": len(stats.token_ids), **stats.meta})
