"""Result objects of the circuits scan: per task (:class:`TaskResult`) and across tasks (:class:`CircuitsResult`).

Files (atomic; no pickles): ``task_<name>.parquet`` (per prompt x head: exact, eap, eap_ig) and
``task_<name>.json`` (accuracy, per-prompt LDs, circuit, faithfulness, timings); the scan adds
``overlap.parquet``, ``roles.parquet`` and ``summary.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path, read_json, write_json
from probe.errors import CorruptFileError
from probe.heads import HeadId

from .overlap import rank_correlation

METHODS = ("exact", "eap", "eap_ig")


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for truncated files
        raise CorruptFileError(f"{path} is not a readable parquet file ({exc}); delete it and rerun the scan") from exc


@dataclass(frozen=True, eq=False)
class TaskResult:
    """One task: per-prompt logit differences and per-prompt head effects ``[N, L, H]`` for each method.

    ``effects[m][n, l, h]`` is ``LD_patched - LD_clean`` (exact) or its attribution estimate (EAP, EAP-IG);
    :meth:`scores` normalises by ``mean(LD_corr - LD_clean)``.
    """

    task: str
    model_id: str
    accuracy: dict
    ld_clean: np.ndarray
    ld_corr: np.ndarray
    effects: dict
    circuit: tuple
    rule: dict
    faithfulness: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def scores(self, method: str = "exact", idx=None) -> np.ndarray:
        e, c, r = self.effects[method], self.ld_clean, self.ld_corr
        if idx is not None:
            e, c, r = e[idx], c[idx], r[idx]
        return e.mean(0) / (r.mean() - c.mean())

    def patched(self) -> np.ndarray:
        """Exact ``LD_patched [N, L, H]``."""
        return self.effects["exact"] + self.ld_clean[:, None, None]

    def method_agreement(self) -> dict:
        ex = self.scores("exact")
        return {f"spearman_exact_{m}": rank_correlation(ex, self.scores(m)) for m in METHODS[1:] if m in self.effects}

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, head, metric) with the normalised score and circuit membership."""
        rows, members = [], set(self.circuit)
        for m in self.effects:
            s = self.scores(m)
            for l in range(s.shape[0]):
                for h in range(s.shape[1]):
                    rows.append({"task": self.task, "layer": l, "head": h, "metric": f"score_{m}",
                                 "value": float(s[l, h]), "in_circuit": HeadId(l, h) in members})
        return pd.DataFrame(rows)

    def plot(self, method: str = "exact"):
        import plotly.express as px

        s = self.scores(method)
        fig = px.imshow(s.T, color_continuous_scale="RdBu_r", color_continuous_midpoint=0, aspect="auto",
                        labels={"x": "layer", "y": "head", "color": "score"},
                        title=f"{self.task}: normalised patching score ({method})")
        for h in self.circuit:
            fig.add_annotation(x=h.layer, y=h.head, text="●", showarrow=False, font={"size": 9})
        return fig

    def save(self, folder) -> Path:
        folder = Path(folder)
        N, L, H = self.effects["exact"].shape
        n, l, h = np.meshgrid(np.arange(N), np.arange(L), np.arange(H), indexing="ij")
        df = pd.DataFrame({"prompt": n.ravel(), "layer": l.ravel(), "head": h.ravel()}
                          | {m: np.asarray(v, dtype=np.float32).ravel() for m, v in self.effects.items()})
        _write_parquet(df, folder / f"task_{self.task}.parquet")
        meta = {"format": "headwise.circuits.task", "version": 1, "task": self.task, "model_id": self.model_id,
                "accuracy": self.accuracy, "ld_clean": self.ld_clean.tolist(), "ld_corr": self.ld_corr.tolist(),
                "circuit": [str(x) for x in self.circuit], "rule": self.rule, "faithfulness": self.faithfulness,
                "timings": self.timings, "shape": [N, L, H], "method_agreement": self.method_agreement()}
        return write_json(folder / f"task_{self.task}.json", meta)

    @classmethod
    def load(cls, folder, task: str) -> "TaskResult":
        folder = Path(folder)
        meta = read_json(folder / f"task_{task}.json", "circuits task summary")
        if meta.get("format") != "headwise.circuits.task":
            raise CorruptFileError(f"{folder}/task_{task}.json is not a circuits task file")
        df = _read_parquet(folder / f"task_{task}.parquet")
        N, L, H = meta["shape"]
        effects = {m: df[m].to_numpy(np.float64).reshape(N, L, H) for m in METHODS if m in df}
        return cls(task, meta["model_id"], meta["accuracy"], np.array(meta["ld_clean"]), np.array(meta["ld_corr"]),
                   effects, tuple(HeadId.parse(x) for x in meta["circuit"]), meta["rule"], meta["faithfulness"],
                   meta["timings"])


@dataclass(frozen=True, eq=False)
class CircuitsResult:
    """All tasks, their pairwise overlap (with bootstrap intervals and a random null), roles, intervention."""

    model_id: str
    tasks: tuple
    overlap: pd.DataFrame
    roles: dict
    intervention: dict = field(default_factory=dict)

    def task(self, name: str) -> TaskResult:
        return next(t for t in self.tasks if t.task == name)

    def to_frame(self) -> pd.DataFrame:
        """Per-head scores of every task and method, plus role scores (task = "roles")."""
        parts = [t.to_frame() for t in self.tasks]
        for role, arr in self.roles.items():
            L, H = np.asarray(arr).shape
            parts.append(pd.DataFrame({"task": "roles", "layer": np.repeat(np.arange(L), H),
                                       "head": np.tile(np.arange(H), L), "metric": role,
                                       "value": np.asarray(arr, dtype=float).ravel(), "in_circuit": False}))
        return pd.concat(parts, ignore_index=True)

    def circuit_roles(self) -> pd.DataFrame:
        """Each task's circuit heads with their score and every role score (one row per task x head)."""
        rows = []
        for t in self.tasks:
            s = t.scores("exact")
            for h in t.circuit:
                rows.append({"task": t.task, "head": str(h), "score": float(s[h.layer, h.head])}
                            | {role: float(np.asarray(a)[h.layer, h.head]) for role, a in self.roles.items()})
        return pd.DataFrame(rows)

    def overlap_matrix(self, metric: str = "jaccard") -> pd.DataFrame:
        names = [t.task for t in self.tasks]
        m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for r in self.overlap[self.overlap.metric == metric].itertuples():
            m.loc[r.task_a, r.task_b] = m.loc[r.task_b, r.task_a] = r.value
        return m

    def plot(self, metric: str = "jaccard"):
        """Overlap matrix heat map above per-task layer x head score maps."""
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        n = len(self.tasks)
        fig = make_subplots(rows=2, cols=max(n, 1), specs=[[{"colspan": max(n, 1)}] + [None] * (n - 1), [{}] * n],
                            subplot_titles=[f"overlap ({metric})"] + [t.task for t in self.tasks])
        m = self.overlap_matrix(metric)
        fig.add_trace(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), zmin=0, zmax=1,
                                 colorscale="Viridis", text=np.round(m.values, 2), texttemplate="%{text}",
                                 showscale=False), row=1, col=1)
        for i, t in enumerate(self.tasks):
            s = t.scores("exact")
            fig.add_trace(go.Heatmap(z=s.T, colorscale="RdBu_r", zmid=0, showscale=False), row=2, col=i + 1)
        fig.update_layout(height=650, title=f"Circuits across tasks ({self.model_id})")
        return fig

    def save(self, folder) -> Path:
        folder = Path(folder)
        for t in self.tasks:
            if not (folder / f"task_{t.task}.json").exists():
                t.save(folder)
        _write_parquet(self.overlap, folder / "overlap.parquet")
        roles = self.to_frame()
        _write_parquet(roles[roles.task == "roles"], folder / "roles.parquet")
        return write_json(folder / "summary.json", {
            "format": "headwise.circuits", "version": 1, "model_id": self.model_id,
            "tasks": [t.task for t in self.tasks], "intervention": self.intervention,
            "per_task": {t.task: {"accuracy": t.accuracy, "circuit": [str(h) for h in t.circuit],
                                  "faithfulness": t.faithfulness, **t.method_agreement()} for t in self.tasks}})

    @classmethod
    def load(cls, folder) -> "CircuitsResult":
        folder = Path(folder)
        meta = read_json(folder / "summary.json", "circuits summary")
        if meta.get("format") != "headwise.circuits":
            raise CorruptFileError(f"{folder}/summary.json is not a circuits summary")
        tasks = tuple(TaskResult.load(folder, t) for t in meta["tasks"])
        roles_df = _read_parquet(folder / "roles.parquet")
        roles = {}
        for role, g in roles_df.groupby("metric"):
            L, H = int(g.layer.max()) + 1, int(g["head"].max()) + 1
            roles[role] = g.sort_values(["layer", "head"]).value.to_numpy().reshape(L, H)
        return cls(meta["model_id"], tasks, _read_parquet(folder / "overlap.parquet"), roles, meta["intervention"])

