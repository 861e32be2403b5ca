"""Head atlas: a layer x head grid of per-head scores, heads grouped by the KV head they share.

Under grouped-query attention several query heads read the same key/value head, so their
patterns are related; ordering and labelling columns by KV group (``kv0:h0 kv0:h1 ... kv1:h3``)
makes that visible. The first scores are the streaming statistics of one prompt (mean entropy,
mean max attention, mean attention on the first token; Xiao et al., "Efficient Streaming Language
Models with Attention Sinks", 2023 for the first-token mass). Saved results of every registered
analysis join the same tidy frame through the result contract alone: :func:`result_scores` takes
each result's ``head_scores()``, roles come from each result's ``roles()`` (its own rule), and
:func:`atlas` merges the newest result of each analysis made for the model into one :class:`HeadGrid`.

>>> from probe import load_model
>>> g = head_grid(load_model("tiny-llama"), "hello")
>>> sorted(g.metrics()), g.column_labels()
(['entropy', 'mass:first', 'max_prob'], ['kv0:h0', 'kv0:h1', 'kv1:h2', 'kv1:h3'])

Methods: docs/methods.md §7.
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
from probe.heads import HeadId, HeadLayout
from probe.stats import KeyGroup
from probe.streaming import stream_stats

from ..contract import Result, head_frame
from ..plots import head_map

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
        return self._matrix(metric)[:, self.layout.grouped_order()]

    def plot(self, metric: str = "entropy", roles: dict[HeadId, list[str]] | None = None) -> go.Figure:
        """Heat map of ``metric``; hover: every metric (up to 4, else ``metric``) and the head's ``roles``."""
        metrics = self.metrics()
        shown = metrics if len(metrics) <= 4 else [metric]
        L, H = self.layout.n_layers, self.layout.n_heads
        cube = {m: self._matrix(m) for m in shown}
        extra = [["".join(f"<br>{m}: {cube[m][l, h]:.4g}" for m in shown) +
                  (f"<br>roles: {', '.join(roles.get(HeadId(l, h), [])) or '-'}" if roles is not None else "")
                  for h in range(H)] for l in range(L)]
        fig = head_map(self._matrix(metric), f"{self.model_id}: {LABELS.get(metric, metric)} per head (columns "
                       "grouped by KV head)", metric, order=self.layout.grouped_order(),
                       x_labels=self.column_labels(), extra=extra)
        G = self.layout.group_size
        for g in range(1, self.layout.n_kv_heads):                             # KV group separators
            fig.add_vline(x=g * G - 0.5, line_color="white", line_width=2)
        return fig.update_layout(xaxis_title="query head (grouped by KV head)", height=max(360, 22 * L + 160))

    def _matrix(self, metric: str) -> np.ndarray:
        """``[layer, head]`` in head order (NaN where a head has no value)."""
        if metric not in self.metrics():
            raise InputError(f"no metric {metric!r}; available: {self.metrics()}")
        wide = self.frame[self.frame.metric == metric].pivot_table(index="layer", columns="head", values="value")
        return wide.reindex(index=range(self.layout.n_layers), columns=range(self.layout.n_heads)).to_numpy()

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


# ----------------------------------------------------------------------------- scores of saved analyses

def result_scores(name: str, result: Result) -> pd.DataFrame:
    """The per-head scores of one result as ``layer, head, metric, value`` (metric prefixed by ``name``)."""
    frame = head_frame({f"{name}: {k}": v for k, v in result.head_scores().items()})
    return frame.dropna(subset=["value"]).reset_index(drop=True)


def merge_roles(*maps: dict[HeadId, list[str]]) -> dict[HeadId, list[str]]:
    out: dict[HeadId, list[str]] = {}
    for m in maps:
        for k, v in m.items():
            out.setdefault(k, []).extend(v)
    return out


def score_grid(model_id: str, layout: HeadLayout, frames: list[pd.DataFrame], meta: dict | None = None) -> HeadGrid:
    """One :class:`HeadGrid` of many analyses' per-head scores (missing heads are NaN)."""
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "head", "metric", "value"])
    full = pd.MultiIndex.from_product([range(layout.n_layers), range(layout.n_heads), frame["metric"].unique()],
                                      names=["layer", "head", "metric"])
    frame = frame.groupby(["layer", "head", "metric"], sort=False)["value"].mean().reindex(full).reset_index()
    return HeadGrid(model_id, layout, frame, meta or {})


@dataclass(frozen=True, eq=False)
class Atlas:
    """The atlas of one model: the grid of every score, each head's roles, and which results they come from."""

    grid: HeadGrid
    roles: dict[HeadId, list[str]]
    sources: tuple[tuple[str, str], ...]       # (analysis, result folder)


def atlas(model_id: str, layout: HeadLayout, results, base: HeadGrid | None = None) -> Atlas:
    """Merge ``results`` (``(analysis name, folder, Result)``, newest first) into one :class:`Atlas`.

    Per analysis the newest result made for ``model_id`` with this layout is used; ``base`` (e.g. the
    prompt statistics of :func:`head_grid`) comes first.
    """
    frames = [base.to_frame()[["layer", "head", "metric", "value"]]] if base is not None else []
    roles, used = [], []
    for name, folder, res in results:
        if name in {u for u, _ in used} or res.model_id != model_id:
            continue
        scores = result_scores(name, res)
        if len(scores) and (scores["layer"].max() >= layout.n_layers or scores["head"].max() >= layout.n_heads):
            continue
        frames.append(scores)
        roles.append(res.roles())
        used.append((name, str(folder)))
    grid = score_grid(model_id, layout, frames, base.meta if base is not None else {})
    return Atlas(grid, merge_roles(*roles), tuple(used))
