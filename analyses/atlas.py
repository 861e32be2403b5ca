"""Head atlas: a layer x head grid of per-head scores, heads grouped by the KV head they share.

Under grouped-query attention several query heads read the same key/value head, so their
patterns are related; ordering and labelling columns by KV group (``kv0:h0 kv0:h1 ... kv1:h3``)
makes that visible. The first scores are the streaming statistics of one prompt (mean entropy,
mean max attention, mean attention on the first token; Xiao et al., "Efficient Streaming Language
Models with Attention Sinks", 2023 for the first-token mass). Saved results of the other analyses
join the same tidy frame (one row per layer, head and metric): :func:`result_scores` takes each
result's own ``to_frame()``, :func:`head_roles` labels heads by each analysis' own rule (retrieval
heads above the threshold, circuit members, similarity families, top grounding coefficients, ACT
calibrated heads, heads with sinks) and :func:`score_grid` merges them into one :class:`HeadGrid`.

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
from probe.heads import HeadId, HeadLayout
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

    def plot(self, metric: str = "entropy", roles: dict | None = None) -> go.Figure:
        """Heat map of ``metric``; hover: every metric (up to 4, else ``metric``) and the head's ``roles``."""
        order, metrics = self.layout.grouped_order(), self.metrics()
        shown = metrics if len(metrics) <= 4 else [metric]
        L = self.layout.n_layers
        cube = np.stack([self.matrix(m) for m in shown], -1)                  # (L, H, M)
        ids = np.array([[f"L{l}H{h}" for h in order] for l in range(L)], dtype=object)
        role_txt = np.array([[", ".join((roles or {}).get(f"L{l}H{h}", [])) or "-" for h in order]
                             for l in range(L)], dtype=object)
        custom = np.concatenate([ids[..., None], role_txt[..., None], cube.round(4).astype(object)], -1)
        hover = "<b>%{customdata[0]}</b> (%{x})<br>" + "<br>".join(
            f"{m}: %{{customdata[{i + 2}]}}" for i, m in enumerate(shown)) + \
            ("<br>roles: %{customdata[1]}" if roles is not None else "") + "<extra></extra>"
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


# ----------------------------------------------------------------------------- scores of saved analyses

def result_scores(kind: str, result) -> pd.DataFrame:
    """Per-head scores of one analysis result as ``layer, head, metric, value`` (metric prefixed by ``kind``).

    Uses each result's own ``to_frame()``; run-level rows (layer -1) and pairwise rows are dropped.
    """
    df = result.to_frame()
    if kind == "circuits":
        df = df.assign(metric=df["task"] + ": " + df["metric"])
        member = df[df["task"] != "roles"].drop_duplicates(["task", "layer", "head"])
        member = member.assign(metric=member["task"] + ": in circuit", value=member["in_circuit"].astype(float))
        df = pd.concat([df, member])
    elif kind == "similarity":
        df = df[df["scope"] == "family"]
    elif "task" in df:                                   # sinks search: per candidate, one task
        df = df.assign(metric=df["task"] + " search: " + df["metric"])
    df = df[(df["layer"] >= 0) & (df["head"] >= 0)]
    out = df[["layer", "head", "metric", "value"]].astype({"layer": int, "head": int, "value": float})
    return out.assign(metric=f"{kind}: " + out["metric"]).reset_index(drop=True)


def head_roles(kind: str, result, top: int = 10) -> dict[str, list[str]]:
    """Short role labels per head (``"L3H1" -> ["retrieval 0.31", ...]``) from each analysis' own rule."""
    roles: dict[str, list[str]] = {}

    def add(layer, head, text):
        roles.setdefault(f"L{int(layer)}H{int(head)}", []).append(text)

    if kind == "retrieval":
        for h in result.retrieval_heads()[:top]:
            add(h.layer, h.head, f"retrieval {result.scores[h.layer, h.head]:.2f}")
    elif kind == "circuits":
        for t in result.tasks:
            for h in t.circuit:
                add(h.layer, h.head, f"{t.task} circuit")
    elif kind == "similarity":
        for i, f in enumerate(result.families):
            add(i // result.n_heads, i % result.n_heads, f"family {int(f)}")
    elif kind == "grounding":
        w = result.head_weights
        for i in np.argsort(-w, axis=None)[:top]:
            add(i // w.shape[1], i % w.shape[1], f"grounding top-{top}")
    elif hasattr(result, "selected"):                    # sinks: ACT search
        for h in result.selected:
            hid = HeadId.parse(h)
            add(hid.layer, hid.head, f"ACT-calibrated ({result.task})")
    elif hasattr(result, "sinks"):                       # sinks: profile (heads with a non-first sink)
        cal = result.sinks[~result.sinks["first"]]
        per = cal.groupby(["layer", "head"]).size().div(result.n_texts)
        for (l, h), v in per[per >= 1].items():
            add(l, h, f"sinks {v:.1f}/prompt")
    return roles


def merge_roles(*maps: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
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
