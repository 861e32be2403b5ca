"""The circuits scan as stages: per-task patching -> path patching -> head roles -> repair -> result.

``tasks``: one unit per task: exact per-head activation patching, EAP and EAP-IG on ``n`` prompt
pairs, the circuit (top ``frac`` of heads) and its faithfulness next to a random-head control;
the reduce measures the overlap of every pair of circuits (bootstrap over prompts, random null).
``paths``: one unit per task: EAP-IG shortlists, path patching confirms, stage by stage (IOI's
name movers <- S-inhibition <- induction/duplicate-token <- previous-token), the top 2% and 5% of
heads per stage, with faithfulness, a random control and the pairwise overlap (:mod:`.paths`).
``roles``: previous-token / duplicate-token / induction scores on repeated tokens, each task's
mover scores and the IOI S2 attention (one unit each). ``repair``: with IOI and Colored Objects
both scanned, the cross-task intervention on the heads the roles pick. Methods: docs/methods.md §3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from probe import families
from probe.heads import HeadId

from ..config import Config, opt
from ..contract import Analysis, Stage, Unit
from . import patching as P
from .checks import check_task
from .overlap import OVERLAP_COLUMNS, overlap_table, select_circuit
from .paths import PathCircuits, run_paths
from .result import CircuitsResult, Repair, TaskResult
from .roles import attention_to, inhibition_heads, intervention, random_heads_like, repeated_token_roles
from .tasks import make_task


@dataclass(frozen=True)
class CircuitsConfig(Config):
    """Tasks, prompts per task, attribution steps, the circuit rule and the bootstrap."""

    tasks: tuple[Literal["ioi", "colored_objects", "induction", "greater_than"], ...] = opt(
        ("ioi", "colored_objects", "induction"), "tasks (clean/corrupted prompt pairs of analyses.circuits.tasks)")
    n: int = opt(32, "prompt pairs per task", min=1)
    seed: int = opt(0, "seed of the prompts and the controls", min=0)
    ig_steps: int = opt(5, "EAP-IG interpolation steps", min=1)
    frac: float = opt(0.05, "circuit = this top fraction of heads by |score| (the paper: 0.02)", min=1e-9, max=1)
    n_boot: int = opt(200, "bootstrap resamples over prompts", min=1)
    paths: bool = opt(True, "path-patching stage: EAP-IG shortlists, path patching confirms, top 2% and 5% per stage")
    shortlist: int = opt(30, "senders path patched per stage (the best by |EAP-IG|)", min=1)

    @classmethod
    def small(cls, model) -> "CircuitsConfig":
        words = model.tokenizer.vocab_size >= 1000          # byte tokenizers have no one-token names
        return cls(tasks=("ioi", "induction") if words else ("induction", "greater_than"), n=2, n_boot=50)


def run_task(model, name: str, n: int = 32, seed: int = 0, ig_steps: int = 5, frac: float = 0.05) -> TaskResult:
    """Exact patching, EAP and EAP-IG for every head on ``n`` prompts of task ``name``; circuit + faithfulness.

    >>> from probe import load_model
    >>> r = run_task(load_model("tiny-llama"), "induction", n=2, ig_steps=1, frac=0.25)
    >>> r.scores().shape, len(r.circuit), sorted(r.effects)     # [layer, head]; 25% of 8 heads
    ((2, 4), 2, ['eap', 'eap_ig', 'exact'])
    """
    families.family(model)  # EAP-IG feeds input embeddings: refuse an unknown family before any work
    task = make_task(model, name, n, seed)
    t0 = time.perf_counter()
    acc = P.accuracy(model, task)
    ld_clean = P.run_ld(model, task.clean, task.good, task.bad)
    ld_corr = P.run_ld(model, task.corrupt, task.good, task.bad)
    z_clean, z_corr = P.record_z(model, task.clean), P.record_z(model, task.corrupt)
    timings = {"setup_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    exact = P.exact_patching(model, task, z_corr) - ld_clean[:, None, None]
    timings["exact_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eap = P.attribution_patching(model, task, z_clean, z_corr)
    timings["eap_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eap_ig = P.attribution_patching(model, task, z_clean, z_corr, ig_steps=ig_steps)
    timings["eap_ig_s"] = time.perf_counter() - t0
    effects = {"exact": exact.numpy().astype(np.float64), "eap": eap.numpy().astype(np.float64),
               "eap_ig": eap_ig.numpy().astype(np.float64)}
    ldc, ldr = ld_clean.numpy().astype(np.float64), ld_corr.numpy().astype(np.float64)
    circuit = select_circuit(effects["exact"].mean(0) / (ldr.mean() - ldc.mean()), frac)
    means = P.mean_values(z_clean)
    faith = P.faithfulness(model, task, circuit, means, ld_clean)
    control = random_heads_like(circuit, model.n_heads, seed, n_layers=model.n_layers)
    faith["random_control"] = P.faithfulness(model, task, control, means,
                                             ld_clean)
    acc["mean_ld_corrupt"] = float(ldr.mean())
    rule = {"rule": "top fraction of heads by |normalised exact patching score|", "frac": frac,
            "size": len(circuit), "n_prompts": n, "seed": seed, "ig_steps": ig_steps}
    return TaskResult(name, model.model_id, acc, ldc, ldr, effects, tuple(circuit), rule, faith, timings)


# ----------------------------------------------------------------------------- stage 1: tasks

def plan_tasks(model, cfg: CircuitsConfig, _) -> list[Unit]:
    families.family(model)                             # an unknown family is refused before any unit runs
    for name in cfg.tasks:                             # word tasks on a byte tokenizer fail before any work
        make_task(model, name, 1, cfg.seed)
    return [Unit(name, {"task": name}) for name in cfg.tasks]


def compute_task(model, cfg: CircuitsConfig, unit: Unit, _) -> dict:
    return run_task(model, unit.spec["task"], cfg.n, cfg.seed, cfg.ig_steps, cfg.frac).to_payload()


def reduce_tasks(model, cfg: CircuitsConfig, payloads: dict, _) -> dict:
    tasks = tuple(TaskResult.from_payload(p) for p in payloads.values())
    per_prompt = {t.task: (t.patched(), t.ld_clean, t.ld_corr) for t in tasks}
    overlap = pd.DataFrame(overlap_table(per_prompt, cfg.frac, cfg.n_boot, cfg.seed), columns=OVERLAP_COLUMNS)
    return {"tasks": tasks, "overlap": overlap}


# ----------------------------------------------------------------------------- stage 2: path patching

def plan_paths(model, cfg: CircuitsConfig, state: dict) -> list[Unit]:
    if not cfg.paths:
        return []
    return [Unit(f"paths-{t.task}", {"task": t.task}) for t in state["tasks"]]


def compute_paths(model, cfg: CircuitsConfig, unit: Unit, state: dict) -> dict:
    task = next(t for t in state["tasks"] if t.task == unit.spec["task"])
    return run_paths(model, task, cfg.n, cfg.seed, cfg.shortlist, cfg.ig_steps)


def reduce_paths(model, cfg: CircuitsConfig, payloads: dict, state: dict) -> dict:
    paths = PathCircuits.from_payloads(list(payloads.values()), model.n_layers * model.n_heads, cfg.n_boot,
                                       cfg.seed) if payloads else None
    return state | {"paths": paths}


# ----------------------------------------------------------------------------- stage 3: roles

def _repairable(cfg: CircuitsConfig) -> bool:
    return {"ioi", "colored_objects"} <= set(cfg.tasks)


def plan_roles(model, cfg: CircuitsConfig, state: dict) -> list[Unit]:
    units = [Unit("repeated", {"kind": "repeated"})]
    units += [Unit(f"mover-{t}", {"kind": "mover", "task": t, "key": "answer", "n": min(cfg.n, 16)})
              for t in cfg.tasks if t != "greater_than"]
    if "ioi" in cfg.tasks:                             # the S-inhibition class's attention (and the repair's pick)
        units.append(Unit("inhibition-ioi", {"kind": "mover", "task": "ioi", "key": "s2", "n": 16}))
    return units


def compute_role(model, cfg: CircuitsConfig, unit: Unit, _) -> dict:
    s = unit.spec
    if s["kind"] == "repeated":
        return repeated_token_roles(model, seed=cfg.seed)
    return {"scores": attention_to(model, make_task(model, s["task"], s["n"], cfg.seed), s["key"])}


def reduce_roles(model, cfg: CircuitsConfig, payloads: dict, state: dict) -> dict:
    roles = dict(payloads["repeated"])
    names = {"inhibition-ioi": "inhibition_s2_ioi"}
    roles |= {names.get(uid, uid.replace("-", "_")): p["scores"] for uid, p in payloads.items() if uid != "repeated"}
    return state | {"roles": roles}


# ----------------------------------------------------------------------------- stage 4: repair

def plan_repair(model, cfg: CircuitsConfig, state: dict) -> list[Unit]:
    if not _repairable(cfg):
        return []
    by = {t.task: t for t in state["tasks"]}
    heads = inhibition_heads(by["ioi"].scores(), by["colored_objects"].circuit, state["roles"]["inhibition_s2_ioi"])
    return [Unit("colored-objects", {"heads": [str(h) for h in heads]})]


def compute_repair(model, cfg: CircuitsConfig, unit: Unit, _) -> dict:
    heads = [HeadId.parse(h) for h in unit.spec["heads"]]
    return intervention(model, heads, make_task(model, "colored_objects", 32, cfg.seed + 1),
                        make_task(model, "colored_objects", 64, cfg.seed + 2), seed=cfg.seed)


def reduce_repair(model, cfg: CircuitsConfig, payloads: dict, state: dict) -> CircuitsResult:
    repair = Repair.from_dict(payloads["colored-objects"]) if payloads else None
    return CircuitsResult(model.model_id, state["tasks"], state["overlap"], state["roles"], repair, state.get("paths"))


CIRCUITS = Analysis(
    name="circuits", title="Circuits", order=30, icon=":material/hub:",
    description="Per task, exact activation patching (and EAP, EAP-IG) scores every head; path patching confirms "
                "the EAP-IG shortlist stage by stage (top 2% and 5% per stage); circuits of different tasks are "
                "compared with bootstrap intervals and a random null.",
    paper="Merullo, Eickhoff, Pavlick, ICLR 2024, Circuit Component Reuse Across Tasks",
    url="https://arxiv.org/abs/2310.08744", methods="docs/methods.md §3",
    config=CircuitsConfig, result=CircuitsResult, min_samples=32,
    stages=(Stage("tasks", plan_tasks, compute_task, reduce_tasks, depends=("n", "seed", "ig_steps", "frac"),
                  check=check_task),
            Stage("paths", plan_paths, compute_paths, reduce_paths, depends=("n", "seed", "ig_steps", "shortlist")),
            Stage("roles", plan_roles, compute_role, reduce_roles, depends=("seed",)),
            Stage("repair", plan_repair, compute_repair, reduce_repair, depends=("seed",))))
