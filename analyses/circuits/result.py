"""Result objects of the circuits scan: per task (:class:`TaskResult`) and across tasks (:class:`CircuitsResult`).

Files (atomic; no pickles): ``task_<name>.parquet`` (per prompt x head: exact, eap, eap_ig) and
``task_<name>.json`` (accuracy, per-prompt LDs, circuit, faithfulness, timings); the scan adds
``overlap.parquet``, ``roles.parquet`` and ``summary.json``.

Frame convention: the ``task`` column names the task of each score (``roles`` for the head-role
scores) and ``in_circuit`` marks the task's circuit members.

Methods: docs/methods.md §3.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe.atomic import atomic_path, read_json, write_json
from probe.errors import CorruptFileError
from probe.heads import HeadId
from probe.shapes import HeadScores, PromptEffectsNp

from ..contract import Result, Stat, head_frame
from ..layout import Figure, Note, Section, Table
from .overlap import rank_correlation
from .paths import WORKS, PathCircuits

METHODS_NOTE = "Method, formulas and controls: docs/methods.md §3 (Merullo et al. 2024; path patching: Wang et al. 2022)."

METHODS = ("exact", "eap", "eap_ig")
STAGE_ROLES = {   # (task, path-patching stage) -> the role scores (roles stage) of the class it stands for
    ("ioi", "name_movers"): ("mover_{task}",), ("ioi", "s_inhibition"): ("inhibition_s2_ioi",),
    ("ioi", "induction_duplicate"): ("induction", "duplicate_token"), ("ioi", "previous_token"): ("previous_token",),
    ("colored_objects", "name_movers"): ("mover_{task}",),
    ("colored_objects", "induction_duplicate"): ("induction", "duplicate_token"),
    ("colored_objects", "previous_token"): ("previous_token",),
    ("induction", "induction"): ("induction",), ("induction", "previous_token"): ("previous_token",)}


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
    effects: dict[str, PromptEffectsNp]
    circuit: tuple[HeadId, ...]
    rule: dict
    faithfulness: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def scores(self, method: str = "exact", idx=None) -> HeadScores:
        e, c, r = self.effects[method], self.ld_clean, self.ld_corr
        if idx is not None:
            e, c, r = e[idx], c[idx], r[idx]
        return e.mean(0) / (r.mean() - c.mean())

    def patched(self) -> PromptEffectsNp:
        """Exact ``LD_patched [N, L, H]``."""
        return self.effects["exact"] + self.ld_clean[:, None, None]

    def method_agreement(self) -> dict:
        ex = self.scores("exact")
        return {f"spearman_exact_{m}": rank_correlation(ex, self.scores(m)) for m in METHODS[1:] if m in self.effects}

    def membership(self) -> HeadScores:
        L, H = self.effects["exact"].shape[1:]
        m = np.zeros((L, H))
        for h in self.circuit:
            m[h.layer, h.head] = 1.0
        return m

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, head, metric) with the normalised score and circuit membership."""
        df = head_frame({f"score_{m}": self.scores(m) for m in self.effects}, task=self.task)
        df["in_circuit"] = [HeadId(l, h) in set(self.circuit) for l, h in zip(df["layer"], df["head"])]
        return df

    def plot(self, method: str = "exact"):
        from .plots import task_map

        return task_map(self, method)

    def to_payload(self) -> dict:
        """The unit payload of this task (arrays and JSON values)."""
        meta = {"task": self.task, "model_id": self.model_id, "accuracy": self.accuracy,
                "circuit": [str(h) for h in self.circuit], "rule": self.rule, "faithfulness": self.faithfulness,
                "timings": self.timings}
        return meta | {"ld_clean": self.ld_clean, "ld_corr": self.ld_corr} | {f"effect_{m}": v for m, v in self.effects.items()}

    @classmethod
    def from_payload(cls, p: dict) -> "TaskResult":
        effects = {m: np.asarray(p[f"effect_{m}"], np.float64) for m in METHODS if f"effect_{m}" in p}
        return cls(p["task"], p["model_id"], p["accuracy"], np.asarray(p["ld_clean"], np.float64),
                   np.asarray(p["ld_corr"], np.float64), effects, tuple(HeadId.parse(h) for h in p["circuit"]),
                   p["rule"], p["faithfulness"], p["timings"])

    def save(self, folder) -> Path:
        folder = Path(folder)
        N, L, H = self.effects["exact"].shape
        n, l, h = np.meshgrid(np.arange(N), np.arange(L), np.arange(H), indexing="ij")
        df = pd.DataFrame({"prompt": n.ravel(), "layer": l.ravel(), "head": h.ravel()}
                          | {m: np.asarray(v, dtype=np.float64).ravel() for m, v in self.effects.items()})
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


@dataclass(frozen=True)
class Repair:
    """The cross-task intervention: ``heads`` boosted with ``alpha``; accuracy before/after; random heads."""

    heads: tuple[HeadId, ...]
    alpha: float
    calib_mean_ld: dict
    before: dict
    after: dict
    control_heads: tuple[HeadId, ...]
    control: dict

    @classmethod
    def from_dict(cls, d: dict) -> "Repair":
        return cls(tuple(HeadId.parse(h) for h in d["heads"]), float(d["alpha"]), d["calib_mean_ld"], d["before"],
                   d["after"], tuple(HeadId.parse(h) for h in d["control_heads"]), d["control"])

    def to_dict(self) -> dict:
        return asdict(self) | {"heads": [str(h) for h in self.heads],
                               "control_heads": [str(h) for h in self.control_heads]}

    def table(self) -> pd.DataFrame:
        rows = [("before", [], self.before), (f"after (alpha {self.alpha})", self.heads, self.after),
                ("random heads (control)", self.control_heads, self.control)]
        return pd.DataFrame([{"condition": c, "heads": ", ".join(map(str, hs)), **acc} for c, hs, acc in rows])


@dataclass(frozen=True, eq=False)
class CircuitsResult(Result):
    """All tasks, their pairwise overlap (bootstrap intervals, a random null), head roles and the repair."""

    FORMAT = "headwise.circuits"

    model_id: str
    tasks: tuple[TaskResult, ...]
    overlap: pd.DataFrame
    roles_scores: dict
    repair: Repair | None = None
    paths: PathCircuits | None = None       # the path-patching stage (None: switched off or saved before it)

    def task(self, name: str) -> TaskResult:
        return next(t for t in self.tasks if t.task == name)

    def head_scores(self) -> dict[str, HeadScores]:
        out = {}
        for t in self.tasks:
            out |= {f"{t.task}: score_{m}": t.scores(m) for m in t.effects} | {f"{t.task}: in circuit": t.membership()}
        return out | {f"roles: {r}": np.asarray(a, dtype=float) for r, a in self.roles_scores.items()}

    def item_scores(self) -> dict[str, np.ndarray]:
        """``<task>: score_<method>`` per prompt: each prompt's effect over the task's mean LD_corr - LD_clean."""
        return {f"{t.task}: score_{m}": t.effects[m] / (t.ld_corr.mean() - t.ld_clean.mean())
                for t in self.tasks for m in t.effects}

    def to_frame(self) -> pd.DataFrame:
        """Per-head scores of every task and method, plus role scores (task = "roles")."""
        parts = [t.to_frame() for t in self.tasks]
        parts.append(head_frame({r: np.asarray(a, dtype=float) for r, a in self.roles_scores.items()}, task="roles",
                                in_circuit=False))
        return pd.concat(parts, ignore_index=True)

    def roles(self) -> dict[HeadId, list[str]]:
        out: dict[HeadId, list[str]] = {}
        for t in self.tasks:
            for h in t.circuit:
                out.setdefault(h, []).append(f"{t.task} circuit")
        return out

    def n_samples(self) -> int:
        return min((t.ld_clean.size for t in self.tasks), default=0)

    def summary(self) -> dict[str, Stat]:
        out = {}
        for t in self.tasks:
            n = int(t.ld_clean.size)
            out[f"{t.task}_acc"] = Stat(f"{t.task}: pair accuracy", t.accuracy["pair_accuracy"], n=n, fmt=".2f")
            out[f"{t.task}_kept"] = Stat(f"{t.task}: circuit of {len(t.circuit)} keeps", t.faithfulness.get("kept"),
                                         n=n, fmt=".2f")
        for r in self.overlap[self.overlap["metric"] == "jaccard"].itertuples():
            out[f"jaccard_{r.task_a}_{r.task_b}"] = Stat(f"{r.task_a} ∩ {r.task_b} Jaccard (null {r.null_mean:.2f})",
                                                         r.value, ci=(r.lo, r.hi), fmt=".2f")
        if self.paths is not None:
            out |= path_stats(self.paths)
        if self.repair is not None:
            out["repair"] = Stat("colored_objects accuracy before -> after repair",
                                 f"{self.repair.before['pair_accuracy']:.2f} -> {self.repair.after['pair_accuracy']:.2f}")
        return out

    def circuit_roles(self) -> pd.DataFrame:
        """Each task's circuit heads with their score and every role score (one row per task x head)."""
        rows = []
        for t in self.tasks:
            s = t.scores("exact")
            for h in t.circuit:
                rows.append({"task": t.task, "head": str(h), "score": float(s[h.layer, h.head])}
                            | {role: float(np.asarray(a)[h.layer, h.head]) for role, a in self.roles_scores.items()})
        return pd.DataFrame(rows)

    def stage_roles(self) -> pd.DataFrame:
        """Each path-patched stage's kept heads with the role score of the class the stage stands for
        (:data:`STAGE_ROLES`: e.g. IOI's previous-token stage -> the previous-token score) and that score's
        rank among all heads (1 = the model's strongest head of that role); one row per task, frac,
        stage, head and role."""
        rows = []
        if self.paths is None:
            return pd.DataFrame(rows)
        for t, by in self.paths.circuits.items():
            for f, r in by.items():
                for s in r.stages:
                    score = dict(zip(s.candidates, s.scores))
                    for role in STAGE_ROLES.get((t, s.name), ()):
                        a = self.roles_scores.get(role.replace("{task}", t))
                        if a is None:
                            continue
                        a = np.asarray(a, dtype=float)
                        for h in s.selected:
                            v = a[h.layer, h.head]
                            rows.append({"task": t, "frac": f, "stage": s.name, "head": str(h),
                                         "path_score": float(score[h]), "role": role.replace("{task}", t),
                                         "role_score": float(v), "role_rank": int((a > v).sum()) + 1,
                                         "n_heads": int(a.size)})
        return pd.DataFrame(rows)

    def task_table(self) -> pd.DataFrame:
        """Per task: accuracy, faithfulness of the circuit and agreement of EAP / EAP-IG with exact patching."""
        rows = []
        for t in self.tasks:
            faith = {f"faithfulness {k}": v for k, v in t.faithfulness.items() if isinstance(v, (int, float))}
            rows.append({"task": t.task, "circuit": ", ".join(map(str, t.circuit))}
                        | {k: v for k, v in t.accuracy.items() if isinstance(v, (int, float))} | faith
                        | t.method_agreement())
        return pd.DataFrame(rows)

    def overlap_matrix(self, metric: str = "jaccard") -> pd.DataFrame:
        names = [t.task for t in self.tasks]
        m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for r in self.overlap[self.overlap.metric == metric].itertuples():
            m.loc[r.task_a, r.task_b] = m.loc[r.task_b, r.task_a] = r.value
        return m

    def plots(self) -> dict:
        from . import plots

        first = self.tasks[0].task if self.tasks else None
        return {"overview": lambda metric="jaccard": plots.overview(self, metric),
                "overlap": lambda metric="jaccard": plots.overlap(self, metric),
                "task": lambda task=first, method="exact": self.task(task).plot(method),
                **({"paths": lambda task=first, frac=0.02: self.paths.circuits[task][float(frac)].plot()}
                   if self.paths is not None else {})}

    def sections(self) -> list[Section]:
        names = tuple(t.task for t in self.tasks)
        methods = tuple(self.tasks[0].effects) if self.tasks else METHODS
        repair = (Table("intervention", self.repair.table()) if self.repair is not None
                  else Note("The repair needs the ioi and colored_objects tasks in the scan."))
        paths = () if self.paths is None else (Section("Path patching: EAP-IG shortlist, path patching confirms", (
            Figure("paths", choices={"task": tuple(self.paths.circuits), "frac": (0.02, 0.05)}),
            Table("path-patched circuits (top 2% and 5% per stage), faithfulness vs random heads", self.paths.table()),
            Table("path-patched overlap: both denominators, bootstrap over prompts, random-set null",
                  self.paths.overlap),
            Table("kept heads and the role score of their stage's class (rank 1 = the strongest of all heads)",
                  self.stage_roles()))),)
        return [Section("", (Note(METHODS_NOTE),)), *paths,
                Section("", (Figure("overlap", choices={"metric": ("jaccard", "overlap_coefficient")}),
                             Table("overlap: value, 95% bootstrap interval over prompts, random-head null", self.overlap)),
                        "columns"),
                Section("Per-task head maps", (Figure("task", choices={"task": names, "method": methods},
                                                      selects_head=True), Table("tasks", self.task_table()))),
                Section("", (Section("circuit heads and roles", (Table("circuit roles", self.circuit_roles()),)),
                             Section("all scores", (Table("circuits", self.to_frame()),)),
                             Section("intervention", (repair,))), "tabs")]

    def save(self, folder) -> Path:
        folder = Path(folder)
        for t in self.tasks:
            t.save(folder)
        _write_parquet(self.overlap, folder / "overlap.parquet")
        roles = self.to_frame()
        _write_parquet(roles[roles.task == "roles"], folder / "roles.parquet")
        if self.paths is not None:
            self.paths.save(folder)
        return self.write_summary(folder, {
            "tasks": [t.task for t in self.tasks], "repair": self.repair.to_dict() if self.repair else None,
            "per_task": {t.task: {"accuracy": t.accuracy, "circuit": [str(h) for h in t.circuit],
                                  "faithfulness": t.faithfulness, **t.method_agreement()} for t in self.tasks}})

    @classmethod
    def load(cls, folder) -> "CircuitsResult":
        folder = Path(folder)
        meta = cls.read_summary(folder)
        tasks = tuple(TaskResult.load(folder, t) for t in meta["tasks"])
        roles = {}
        for role, g in _read_parquet(folder / "roles.parquet").groupby("metric"):
            L, H = int(g.layer.max()) + 1, int(g["head"].max()) + 1
            roles[role] = g.sort_values(["layer", "head"]).value.to_numpy().reshape(L, H)
        repair = Repair.from_dict(meta["repair"]) if meta.get("repair") else None
        return cls(meta["model_id"], tasks, _read_parquet(folder / "overlap.parquet"), roles, repair,
                   PathCircuits.load(folder))


def path_stats(paths: PathCircuits) -> dict[str, Stat]:
    """Headlines of the path-patching stage: per task the 2% circuit's faithfulness next to random heads,
    and each pair's 2% Jaccard with its bootstrap interval and the random-set null."""
    out = {}
    for t, by in paths.circuits.items():
        fa, r = paths.faithfulness[t]["0.02"], by[0.02]
        flag = "" if paths.works(t) else f" (task fails: accuracy {paths.accuracy[t]:.2f} < {WORKS})"
        rc, vs = fa["random_control"], fa.get("vs_random", {}).get("kept_normalised")
        beyond = "" if vs is None else (f", circuit - random {vs['estimate']:+.2f} [{vs['lo']:+.2f}, "
                                        f"{vs['hi']:+.2f}] over {vs['n_draws']} draws")
        ci = fa.get("ci", {}).get("kept_normalised")
        out[f"path_{t}"] = Stat(f"{t}: path-patched 2% circuit ({len(r.circuit)} heads) keeps{flag}; random heads "
                                f"{rc['kept_normalised']:.2f}{beyond}", fa["kept_normalised"],
                                n=int(len(r.ld_clean)), ci=None if ci is None else tuple(ci), fmt=".2f")
    d = paths.overlap[(paths.overlap.frac == 0.02)]
    for r in d.itertuples():
        flag = "" if r.both_work else "; a task fails"
        out[f"path_{r.metric}_{r.task_a}_{r.task_b}"] = Stat(
            f"{r.task_a} ∩ {r.task_b} path-patched 2% {r.metric} (null {r.null_mean:.2f}, p {r.p_null:.3f}{flag})",
            r.value, n=int(r.n), ci=(r.lo, r.hi), fmt=".2f")
    return out
