"""The cross-analysis study as stages: sources -> streaming roles -> agreement -> means -> transfer -> report.

``sources``: one unit per analysis: the newest saved result for the model under ``results`` (then
the runs shipped in ``data/``), or, with ``run_missing``, a run of its small config into the first
results folder; without it a missing result is refused before any work, with the command to run.
``repeats``: one unit per repeated random-token sequence (:mod:`.repeats`). ``agreement``: one unit,
the table of every pair of scores (:mod:`.agreement`). ``means``: the mean-ablation values.
``transfer``: one unit per (role, task, condition): ``top`` (the role's heads knocked out), ``r<seed>``
(layer-matched random heads) and one ``plain`` run per task; units carry their heads, so a rerun
resumes and a changed source recomputes only what it changes. Methods: docs/methods.md §7.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from probe.atomic import read_json
from probe.errors import CorruptFileError, InputError
from probe.heads import HeadId

from ..config import Config, opt
from ..contract import Analysis, Command, Stage, Unit, no_units
from .agreement import agreement_table
from .card import card_arguments, card_command
from .grid import merge_roles
from .knockouts import ROLE_SOURCES, knockout_spec, mean_outputs, resolve_role
from .repeats import LABELS, SCORES, repeated_sequence, sequence_scores
from .result import AtlasResult
from .scores import repeat_scores, result_scores
from .tasks import TASKS, TaskSettings, evaluate, get_task
from .transfer import COLUMNS, transfer_table

ANALYSES = ("retrieval", "sinks", "circuits", "similarity", "grounding")
ROLES = ("retrieval", "act", "circuit.ioi", "circuit.induction", "grounding", "induction", "previous_token")
NIAH_CELLS = (("code", 300, 25.0), ("cat", 300, 50.0), ("lisbon", 300, 75.0), ("word", 300, 25.0),
              ("code", 300, 75.0), ("cat", 300, 25.0), ("lisbon", 300, 50.0), ("word", 300, 75.0))
TASK_FIELDS = ("n_items", "niah_cells", "max_new_tokens", "induction_len", "token_range", "bos", "loss_texts",
               "loss_tokens", "seed")


@dataclass(frozen=True)
class AtlasConfig(Config):
    """Where the saved results are, the streaming scores, the statistics and the transfer matrix."""

    results: tuple[str, ...] = opt(("results",), "folders of saved results to reuse (searched recursively, newest "
                                                 "first)")
    shipped: bool = opt(True, "also reuse the runs shipped in data/<analysis>/<model>/ (after --results)")
    run_missing: bool = opt(False, "run a missing analysis with its small config (into the first --results folder) "
                                   "instead of refusing with the command to run")
    analyses: tuple[str, ...] | None = opt(ANALYSES, "analyses whose saved scores enter the study (none: only the "
                                                     "study's own streaming scores)")
    n_sequences: int = opt(16, "repeated random-token sequences (the items of the streaming scores)", min=3)
    seq_len: int = opt(20, "random tokens per copy (a sequence is two copies)", min=2)
    token_range: tuple[int, ...] | None = opt(None, "token ids low,high of the random tokens (default: 1000,20000 "
                                                    "within the vocabulary)", min=0)
    bos: Literal["auto", "yes", "no"] = opt("auto", "what precedes each random sequence (streaming scores and the "
                                                    "induction task): the tokenizer's own prefix, its BOS, nothing")
    seed: int = opt(0, "seed of the sequences, resamples, permutations, task items and random head sets", min=0)
    k: int = opt(10, "top-k heads of a score (overlap) and of a role without its own k", min=1)
    n_boot: int = opt(1000, "bootstrap resamples", min=10)
    n_perm: int = opt(1000, "draws of each permutation null", min=10)
    transfer: bool = opt(True, "run the causal transfer matrix")
    roles: tuple[str, ...] = opt(ROLES, f"roles knocked out: {', '.join(ROLE_SOURCES)} or circuit.<task>")
    tasks: tuple[Literal["niah", "ioi", "induction", "grounded", "act", "loss"], ...] = opt(TASKS, "tasks measured")
    n_random: int = opt(5, "random head sets per role (same layers, outside the role's heads)", min=1)
    min_draws: int = opt(5, "random sets needed to call a drop beyond random", min=1)
    n_items: int = opt(32, "items of the ioi, induction, grounded and act tasks", min=2)
    niah_cells: tuple[tuple[str, int, float], ...] = opt(NIAH_CELLS, "needle:length:depth cells of the niah task")
    max_new_tokens: int = opt(16, "answer length of the niah task", min=1)
    induction_len: int = opt(12, "random tokens of an induction prompt (then its first half again)", min=4)
    loss_texts: int = opt(4, "held-out texts of the loss task", min=1)
    loss_tokens: int = opt(128, "tokens per loss text", min=8)
    reference_texts: int = opt(8, "texts (data/similarity prompts) the mean-ablation values average", min=1)

    def check(self) -> None:
        bad = [r for r in self.roles if r not in ROLE_SOURCES and not r.startswith("circuit.")]
        if bad:
            raise InputError(f"unknown role(s) {bad}: use {', '.join(ROLE_SOURCES)} or circuit.<task>")
        if self.min_draws > self.n_random:
            raise InputError(f"min_draws {self.min_draws} > n_random {self.n_random}: no cell could be called "
                             "beyond random; raise n_random")

    @classmethod
    def small(cls, model) -> "AtlasConfig":
        words = model.tokenizer.vocab_size >= 1000          # byte tokenizers: no IOI, NIAH or grounding answers
        k = max(1, min(10, model.n_layers * model.n_heads // 4))
        return cls(run_missing=True, k=k, n_sequences=8, seq_len=12 if words else 6, n_boot=200, n_perm=200,
                   roles=("retrieval", "act", "circuit.ioi" if words else "circuit.induction", "induction",
                          "previous_token"),
                   tasks=TASKS if words else ("induction", "act", "loss"), n_items=16 if words else 8,
                   niah_cells=NIAH_CELLS[:4], loss_texts=2, loss_tokens=64 if words else 32, reference_texts=2,
                   induction_len=12 if words else 8)


# ----------------------------------------------------------------------------- stage 1: sources

def _fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "summary.json").read_bytes()).hexdigest()[:16]


def _newest(model, cfg: AtlasConfig) -> dict:
    """Analysis -> the newest saved result folder made for ``model`` (results folders first, then shipped)."""
    from .. import registry
    from ..data import data_dir

    roots = [Path(r).expanduser() for r in cfg.results] + ([data_dir()] if cfg.shipped else [])
    found: dict = {}
    for saved in registry.find_results(*roots):
        name = saved.analysis.name
        if name in (cfg.analyses or ()) and name not in found:
            try:
                if read_json(saved.path / "summary.json").get("model_id") == model.model_id:
                    found[name] = saved.path
            except (CorruptFileError, OSError, AttributeError):
                continue
    return found


def plan_sources(model, cfg: AtlasConfig, _) -> list[Unit]:
    from .. import registry

    for name in (cfg.analyses or ()):
        registry.get(name)                                          # unknown names fail here
    needs = {ROLE_SOURCES[r][0] if r in ROLE_SOURCES else "circuits" for r in cfg.roles} - {None}
    if cfg.transfer and needs - set(cfg.analyses or ()):
        raise InputError(f"roles {list(cfg.roles)} need saved {sorted(needs - set(cfg.analyses or ()))} results: add them "
                         "to --analyses or drop those roles")
    found = _newest(model, cfg)
    missing = [n for n in (cfg.analyses or ()) if n not in found]
    if missing and not cfg.run_missing:
        where = Path(cfg.results[0])
        cmds = "; ".join(f"headwise scan {n} --model {model.model_id} --out {where / f'{n}-{model.model_id}'}"
                         for n in missing)
        raise InputError(f"no saved {', '.join(missing)} result for {model.model_id} under {', '.join(cfg.results)}"
                         f"{' or the shipped data' if cfg.shipped else ''}: run {cmds} (small configs: --run-missing)")
    units = [Unit(f"source-{n}", {"analysis": n, "folder": str(f), "fingerprint": _fingerprint(f)})
             for n, f in found.items()]
    safe = model.model_id.replace("/", "_")
    return units + [Unit(f"source-{n}", {"analysis": n, "folder": str(Path(cfg.results[0]) / f"{n}-{safe}"),
                                         "run": "small"}) for n in missing]


def compute_source(model, cfg: AtlasConfig, unit: Unit, _) -> dict:
    from .. import registry
    from ..runner import run

    s = unit.spec
    if s.get("run"):
        analysis = registry.get(s["analysis"])
        print(f"headwise: atlas: running {analysis.name} (its small config) into {s['folder']}", file=sys.stderr)
        run(analysis, model, analysis.config.small(model), store=s["folder"])
    folder = Path(s["folder"])
    return {"analysis": s["analysis"], "folder": str(folder), "fingerprint": _fingerprint(folder)}


def reduce_sources(model, cfg: AtlasConfig, payloads: dict, _) -> dict:
    from .. import registry

    results, rows = {}, []
    for p in payloads.values():
        res = registry.load_result(p["folder"])
        if res.model_id != model.model_id:
            raise InputError(f"{p['folder']} holds a result for {res.model_id}, not {model.model_id}")
        results[p["analysis"]] = res
        rows.append({"analysis": p["analysis"], "folder": p["folder"], "fingerprint": p["fingerprint"],
                     "n_samples": int(res.n_samples())})
    scores = [s for name, r in results.items() for s in result_scores(name, r)]
    return {"results": results, "sources": pd.DataFrame(rows), "scores": scores}


# ----------------------------------------------------------------------------- stage 2: streaming roles

def plan_repeats(model, cfg: AtlasConfig, state: dict) -> list[Unit]:
    spec = {"n": cfg.seq_len, "token_range": cfg.token_range, "seed": cfg.seed, "bos": cfg.bos}
    repeated_sequence(model, cfg.seq_len, seed=cfg.seed, index=0, token_range=cfg.token_range, bos=cfg.bos)  # fail early
    return [Unit(f"seq-{i:03d}", spec | {"index": i}) for i in range(cfg.n_sequences)]


def compute_repeat(model, cfg: AtlasConfig, unit: Unit, _) -> dict:
    s = unit.spec
    ids = repeated_sequence(model, s["n"], seed=s["seed"], index=s["index"], token_range=s["token_range"], bos=s["bos"])
    return sequence_scores(model, ids, s["n"])


def reduce_repeats(model, cfg: AtlasConfig, payloads: dict, state: dict) -> dict:
    items = {k: np.stack([p[k] for p in payloads.values()]) for k in SCORES}      # fixed order (stored keys sort)
    return state | {"scores": state["scores"] + repeat_scores(items, LABELS)}


# ----------------------------------------------------------------------------- stage 3: agreement

def _inputs(cfg: AtlasConfig, state: dict) -> dict:
    """What the later units are made of: the sources' fingerprints and the streaming scores' settings."""
    return {"sources": sorted(state["sources"]["fingerprint"]) if len(state["sources"]) else [],
            "repeats": [cfg.n_sequences, cfg.seq_len, cfg.token_range, cfg.seed, cfg.bos]}


def plan_agreement(model, cfg: AtlasConfig, state: dict) -> list[Unit]:
    return [Unit("table", _inputs(cfg, state) | {"scores": [s.name for s in state["scores"]]})]


def compute_agreement(model, cfg: AtlasConfig, unit: Unit, state: dict) -> dict:
    table = agreement_table(state["scores"], k=cfg.k, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.seed)
    return {"rows": table.to_dict("records")}


def reduce_agreement(model, cfg: AtlasConfig, payloads: dict, state: dict) -> dict:
    agreement = pd.DataFrame(payloads["table"]["rows"])
    roles, skipped = {}, {}
    if cfg.transfer:
        scores = {s.name: s for s in state["scores"]}
        for name in cfg.roles:
            role = resolve_role(name, state["results"], scores, cfg.k)
            if role.heads:
                roles[name] = role
            else:
                skipped[name] = f"{role.rule}: no heads, nothing to knock out"
    return state | {"agreement": agreement, "roles": roles, "skipped": skipped}


# ----------------------------------------------------------------------------- stage 4: mean-ablation values

def plan_means(model, cfg: AtlasConfig, state: dict) -> list[Unit]:
    if not any(r.knockout == "mean" for r in state["roles"].values()):
        return []
    return [Unit("means", {"texts": cfg.reference_texts, "max_tokens": 128})]


def compute_means(model, cfg: AtlasConfig, unit: Unit, _) -> dict:
    from ..similarity.data import load_texts
    from ..similarity.run import tokenize

    texts = tokenize(model, load_texts("prompts")[:unit.spec["texts"]], unit.spec["max_tokens"], "reference text")
    return {"means": mean_outputs(model, texts).cpu().numpy()}


def reduce_means(model, cfg: AtlasConfig, payloads: dict, state: dict) -> dict:
    means = torch.as_tensor(payloads["means"]["means"], device=model.device) if payloads else None
    return state | {"means": means}


# ----------------------------------------------------------------------------- stage 5: transfer

def act_task_of(task: str, folder) -> str:
    """The ACT task a sinks result names; a task file named by a path that is gone (a shipped or moved
    result) is read from the ``task.json`` its result folder carries, when it does."""
    carried = Path(folder) / "task.json"
    return str(carried) if task.endswith(".json") and not Path(task).exists() and carried.exists() else task


def _settings(cfg: AtlasConfig, state: dict) -> TaskSettings:
    sinks = state["results"].get("sinks")
    folder = dict(zip(state["sources"]["analysis"], state["sources"]["folder"])).get("sinks", ".") \
        if len(state["sources"]) else "."
    act = {"act_task": act_task_of(sinks.search.config.get("task", "sentiment"), folder),
           "act_shots": int(sinks.search.config.get("shots", 0))} if sinks is not None else {}
    return TaskSettings(**{f: getattr(cfg, f) for f in TASK_FIELDS}, **act)


def plan_transfer(model, cfg: AtlasConfig, state: dict) -> list[Unit]:
    if not cfg.transfer or not state["roles"]:
        return []
    settings = _settings(cfg, state)
    for t in cfg.tasks:                                              # a task the model cannot do fails here
        get_task(t).build(model, settings)
    base = {"settings": _jsonable(settings), "means": cfg.reference_texts}
    units = [Unit(f"none-{t}-plain", base | {"task": t, "heads": [], "knockout": "none"}) for t in cfg.tasks]
    for name, role in state["roles"].items():
        sets = {"top": role.heads} | role.random_sets(model.layout, cfg.n_random)
        for t in cfg.tasks:
            units += [Unit(f"{name}-{t}-{c}", base | {"task": t, "role": name, "condition": c, "knockout": role.knockout,
                                                       "act": role.act, "heads": [str(h) for h in hs]})
                      for c, hs in sets.items()]
    return units


def _jsonable(settings: TaskSettings) -> dict:
    from ..config import jsonable

    return jsonable(settings.__dict__)


def compute_transfer(model, cfg: AtlasConfig, unit: Unit, state: dict) -> dict:
    s = unit.spec
    settings = _settings(cfg, state)
    task = get_task(s["task"])
    decode_only = s["knockout"] == "uniform" and not task.emits_all_rows
    spec = None if s["knockout"] == "none" else knockout_spec(
        s["knockout"], [HeadId.parse(h) for h in s["heads"]], means=state["means"], act=s["act"], decode_only=decode_only)
    return {"perf": evaluate(model, s["task"], settings, spec, decode_only)}


def reduce_transfer(model, cfg: AtlasConfig, payloads: dict, state: dict) -> dict:
    outcomes = {}
    for uid, p in payloads.items():
        role, task, cond = uid.rsplit("-", 2)
        outcomes[(role, task, cond)] = np.asarray(p["perf"], np.float64)
    table = transfer_table(outcomes, state["roles"], list(cfg.tasks), min_draws=cfg.min_draws, n_boot=cfg.n_boot,
                           seed=cfg.seed) if outcomes else pd.DataFrame(columns=COLUMNS)
    rows = [{"role": r, "task": t, "condition": c, "item": i, "value": float(v)}
            for (r, t, c), vals in outcomes.items() for i, v in enumerate(vals)]
    return state | {"transfer": table, "outcomes": pd.DataFrame(rows, columns=["role", "task", "condition", "item",
                                                                                 "value"])}


# ----------------------------------------------------------------------------- stage 6: the result

def reduce_report(model, cfg: AtlasConfig, payloads: dict, state: dict) -> AtlasResult:
    roles = state["roles"]
    sets = {n: {"top": r.heads} | r.random_sets(model.layout, cfg.n_random) for n, r in roles.items()}
    table = pd.DataFrame([{"role": n, "source": r.source, "knockout": r.knockout, "rule": r.rule,
                           "n_heads": len(r.heads), "heads": ", ".join(map(str, r.heads)), "skipped": ""}
                          for n, r in roles.items()] +
                         [{"role": n, "skipped": why} for n, why in state["skipped"].items()],
                         columns=["role", "source", "knockout", "rule", "n_heads", "heads", "skipped"])
    meta = cfg.to_dict() | {"weights_hash": model.weights_hash}
    empty = pd.DataFrame(columns=COLUMNS)
    outcomes = pd.DataFrame(columns=["role", "task", "condition", "item", "value"])
    return AtlasResult(model.model_id, model.layout, tuple(state["scores"]), state["agreement"],
                       state.get("transfer", empty), table, sets, state.get("outcomes", outcomes),
                       merge_roles(*(r.roles() for r in state["results"].values())), state["sources"], meta)


ATLAS = Analysis(
    name="atlas", title="Cross-analysis study", order=60, icon=":material/join_inner:",
    description="Which heads do what: every pair of per-head scores of the saved analyses (Spearman and top-k "
                "overlap, intervals over items, permutation nulls within layers) and the causal transfer matrix "
                "(knock out a role's heads, measure every task, against random heads).",
    paper="Olsson et al. 2022, In-context Learning and Induction Heads (role scores); the five analyses' papers",
    url="https://arxiv.org/abs/2209.11895", methods="docs/methods.md §7",
    config=AtlasConfig, result=AtlasResult, min_samples=16,
    stages=(Stage("sources", plan_sources, compute_source, reduce_sources),
            Stage("repeats", plan_repeats, compute_repeat, reduce_repeats),
            Stage("agreement", plan_agreement, compute_agreement, reduce_agreement, depends=("k", "n_boot", "n_perm",
                                                                                           "seed")),
            Stage("means", plan_means, compute_means, reduce_means),
            Stage("transfer", plan_transfer, compute_transfer, reduce_transfer, depends=TASK_FIELDS),
            Stage("report", no_units, None, reduce_report)),
    commands=(Command("head", "print the card of one head: every role and score with its rank, the transfer cells it "
                              "takes part in, a sample pattern (e.g. `headwise head L18H6 --results results`)",
                      card_arguments, card_command),))
