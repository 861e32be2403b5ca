"""The circuits scan's path-patching stage (Wang et al. 2022; Merullo et al. 2024 §3; docs/methods.md §3).

Per task, EAP-IG (the ``tasks`` stage's per-prompt attribution scores) shortlists the senders and
path patching (:mod:`.path_patching`) confirms them, stage by stage (:data:`TASK_STAGES`: IOI's four
classes, induction's two, a two-stage mover -> query circuit for the other tasks), keeping the top
2% and the top 5% of heads per stage. Each circuit gets its faithfulness (mean-ablating the rest)
next to a random-head control in the same layers, and every pair of tasks their overlap, both
denominators (Jaccard and the overlap coefficient), with a bootstrap over prompts and the
random-set null (:func:`.path_patching.path_overlap`). A task the model fails (pair accuracy below
:data:`WORKS`) is flagged in every row that uses it: its circuit says little.

Families whose q/k/v are one fused projection (GPT-2, GPT-NeoX, Phi-3) get the logits stage only
(exact; the skipped stages are named in the result), never an approximation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probe import families
from probe.atomic import read_json, write_json

from ..inference import _quantiles
from . import patching as P
from .path_patching import INDUCTION_STAGES, IOI_STAGES, PathPatchingResult, Stage, circuits_at, path_overlap
from .roles import random_heads_like
from .tasks import make_task

FRACS = (0.02, 0.05)          # the paper's ~2% per stage and the single-stage scan's 5%
N_RANDOM = 10                 # random head sets per circuit (the control; 10 are needed to call a gain)
WORKS = 0.7                   # pair accuracy a task needs before its circuit is read as the task's
TASK_STAGES = {
    "ioi": IOI_STAGES,
    "colored_objects": IOI_STAGES,                 # Merullo et al.: the same mover / inhibition structure
    "induction": INDUCTION_STAGES,
    "greater_than": (Stage("output_heads"), Stage("query_inputs", "output_heads", "q")),
}
OVERLAP_COLUMNS = ["frac", "task_a", "task_b", "metric", "value", "lo", "hi", "n", "null_mean", "null_q95", "p_null",
                   "both_work"]


def stages_for(model, task: str) -> tuple[Stage, ...]:
    """The task's stages; the logits stage alone where the family fuses q/k/v."""
    stages = TASK_STAGES.get(task, TASK_STAGES["greater_than"])
    return stages if families.family(model).head_inputs is not None else stages[:1]


def run_paths(model, task_result, n: int, seed: int, shortlist: int, ig_steps: int) -> dict:
    """Path-patched circuits of one task at :data:`FRACS`, shortlisted by the task's EAP-IG scores, and
    their faithfulness with a random-head control (a unit payload)."""
    name = task_result.task
    task = make_task(model, name, n, seed)
    rank = np.abs(task_result.effects["eap_ig"].mean(0))                  # [L, H] the stage-1 shortlist
    cache: dict = {"rank": rank}
    stages = stages_for(model, name)
    res = circuits_at(model, task, stages, FRACS, shortlist=shortlist, ig_steps=ig_steps, cache=cache)
    means = P.mean_values(cache["z_clean"])
    faith = {str(f): circuit_faithfulness(model, task, r.circuit, means, cache["ld_clean"], seed)
             for f, r in res.items()}
    skipped = [s.name for s in TASK_STAGES.get(name, ())[len(stages):]]
    return {"task": name, "results": {str(f): r.to_dict() for f, r in res.items()}, "faithfulness": faith,
            "skipped_stages": skipped, "shortlist": shortlist, "pair_accuracy": task_result.accuracy["pair_accuracy"]}


def circuit_faithfulness(model, task, circuit, means, ld_clean, seed: int = 0, draws: int = N_RANDOM) -> dict:
    """The circuit's faithfulness (per-prompt LDs, bootstrap intervals) next to ``draws`` random head sets in
    the same layers (seeds ``seed .. seed + draws - 1``), and the paired difference circuit - random."""
    f = P.faithfulness(model, task, circuit, means, ld_clean)
    none = torch.tensor(f["per_prompt"]["ld_all_ablated"], device="cpu")          # run_ld returns host LDs
    sets = [random_heads_like(circuit, model.n_heads, seed + d, n_layers=model.n_layers) for d in range(draws)]
    ctrl = [P.faithfulness(model, task, hs, means, ld_clean, none) | {"heads": [str(h) for h in hs]} for hs in sets]
    mean = {k: float(np.mean([c[k] for c in ctrl])) for k in ("kept_normalised", "removed", "kept")}
    return f | {"ci": P.faithfulness_ci(f, seed=seed),
                "random_control": mean | {"n_draws": draws, "draws": ctrl},
                "vs_random": {k: versus_random(f, ctrl, k, seed=seed) for k in ("kept_normalised", "removed")}}


def versus_random(f: dict, controls: list[dict], key: str, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``key`` of the circuit minus the mean over random draws, with a two-level bootstrap (prompts resampled
    together for circuit and controls, draws resampled): ``{estimate, lo, hi, n (prompts), n_draws}``."""
    rng, n = np.random.default_rng(seed), len(f["per_prompt"]["ld_clean"])
    stat = lambda idx, ds: P.faithfulness_ratios(f["per_prompt"], idx)[key] - float(np.mean(  # noqa: E731
        [P.faithfulness_ratios(controls[d]["per_prompt"], idx)[key] for d in ds]))
    vals = [stat(rng.integers(0, n, n), rng.integers(0, len(controls), len(controls))) for _ in range(n_boot)]
    lo, hi = _quantiles(vals, 0.95)
    return {"estimate": stat(np.arange(n), range(len(controls))), "lo": lo, "hi": hi, "n": n,
            "n_draws": len(controls)}


def _with_ci(key: str, fa: dict, ci: dict) -> dict:
    lo, hi = ci.get(key, (float("nan"), float("nan")))
    return {key: fa[key], f"{key} lo": lo, f"{key} hi": hi}


@dataclass(frozen=True, eq=False)
class PathCircuits:
    """Every task's path-patched circuits (per frac), their faithfulness and the pairwise overlap."""

    circuits: dict                      # task -> {frac: PathPatchingResult}
    faithfulness: dict                  # task -> {str(frac): faithfulness dict (+ random_control)}
    accuracy: dict                      # task -> pair accuracy
    overlap: pd.DataFrame               # OVERLAP_COLUMNS
    skipped: dict                       # task -> stages not run (fused q/k/v)

    @classmethod
    def from_payloads(cls, payloads: list[dict], n_heads_total: int, n_boot: int = 200, seed: int = 0):
        circ = {p["task"]: {float(f): PathPatchingResult.from_dict(d) for f, d in p["results"].items()}
                for p in payloads}
        acc = {p["task"]: float(p["pair_accuracy"]) for p in payloads}
        rows, names = [], list(circ)
        for f in FRACS:
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    ov = path_overlap(circ[a][f], circ[b][f], n_heads_total, n_boot=n_boot, seed=seed)
                    for metric, v in ov.items():
                        rows.append({"frac": f, "task_a": a, "task_b": b, "metric": metric, "value": v["estimate"],
                                     **{k: v[k] for k in ("lo", "hi", "n", "null_mean", "null_q95", "p_null")},
                                     "both_work": acc[a] >= WORKS and acc[b] >= WORKS})
        return cls(circ, {p["task"]: p["faithfulness"] for p in payloads}, acc,
                   pd.DataFrame(rows, columns=OVERLAP_COLUMNS), {p["task"]: p["skipped_stages"] for p in payloads})

    def works(self, task: str) -> bool:
        return self.accuracy[task] >= WORKS

    def table(self) -> pd.DataFrame:
        """Per task and frac: the circuit, per-stage heads, faithfulness and the random control's."""
        rows = []
        for t, by in self.circuits.items():
            for f, r in by.items():
                fa = self.faithfulness[t][str(f)]
                ci, vs = fa.get("ci", {}), fa.get("vs_random", {})
                rows.append({"task": t, "frac": f, "task_works": self.works(t), "size": len(r.circuit),
                             "circuit": ", ".join(map(str, r.circuit)),
                             **{f"stage {s.name}": ", ".join(map(str, s.selected)) for s in r.stages},
                             **_with_ci("kept_normalised", fa, ci), **_with_ci("removed", fa, ci),
                             "random_kept_normalised": fa["random_control"]["kept_normalised"],
                             "random_removed": fa["random_control"]["removed"],
                             "random_draws": fa["random_control"].get("n_draws", 1),
                             **{f"{k} - random{e}": vs[k][x] for k in vs for e, x in (("", "estimate"), (" lo", "lo"),
                                                                                       (" hi", "hi"))},
                             "n_prompts": int(len(r.ld_clean))})
        return pd.DataFrame(rows)

    def stage_frame(self) -> pd.DataFrame:
        """Every path-patched sender's score (task, frac, stage, channel, layer, head, score, selected)."""
        return pd.concat([r.to_frame() for by in self.circuits.values() for r in by.values()], ignore_index=True)

    def matrix(self, frac: float = 0.02, metric: str = "jaccard") -> pd.DataFrame:
        names = list(self.circuits)
        m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        d = self.overlap[(self.overlap.frac == frac) & (self.overlap.metric == metric)]
        for r in d.itertuples():
            m.loc[r.task_a, r.task_b] = m.loc[r.task_b, r.task_a] = r.value
        return m

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / "paths.json", {
            "format": "headwise.path_circuits", "version": 1, "accuracy": self.accuracy, "skipped": self.skipped,
            "faithfulness": self.faithfulness,
            "circuits": {t: {str(f): r.to_dict() for f, r in by.items()} for t, by in self.circuits.items()},
            "overlap": self.overlap.to_dict(orient="records")})

    @classmethod
    def load(cls, folder: Path) -> "PathCircuits | None":
        path = Path(folder) / "paths.json"
        if not path.exists():
            return None
        d = read_json(path, "path-patched circuits")
        circ = {t: {float(f): PathPatchingResult.from_dict(x) for f, x in by.items()} for t, by in d["circuits"].items()}
        return cls(circ, d["faithfulness"], d["accuracy"], pd.DataFrame(d["overlap"], columns=OVERLAP_COLUMNS),
                   d["skipped"])
