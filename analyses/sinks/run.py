"""The ACT scan as stages: profile prompts -> candidate heads -> held-out evaluation -> result.

``profile``: one unit per prompt, the keys each head treats as sinks and the attention mass by
token type (:mod:`.profile`). ``search``: the plain model's calibration-split score and, one unit
per candidate layer, each of its heads calibrated alone (:mod:`.search`); the reduce keeps the
heads by the selection rule: ``accuracy`` (the paper: the head improves accuracy) or
``gold_logprob`` (it raises the gold label's log-probability, finer on small splits). ``heldout``:
per item of the held-out split, the plain model and, for *both* selection rules, all kept heads
calibrated together and ``n_random`` sets of as many random heads drawn outside the kept set (the
control); the reduce judges every before/after with paired intervals and tests and calls it a gain
only when it beats the control's upper bound (:mod:`.power`, :func:`analyses.inference.call_gain`). The ``<task>@large`` tasks
(``--task sentiment@large``, :mod:`.items`) give >= 200 held-out items. The result holds the
profile, the search and the calibration file. Methods: docs/methods.md §2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from probe import InterventionSpec, SinkCalibration, families
from probe.heads import HeadId

from ..config import Config, opt
from ..contract import Analysis, Stage, Unit
from .calibration import Calibration
from .profile import SinkProfile, text_rows
from .result import SinksResult
from .power import ActPower, judge
from .search import (METRICS, SearchResult, act_spec, candidate_heads, control_pool, evaluate, item_outcomes,
                     random_heads, scan_layer, select_heads)
from .tasks import label_token_ids, load_task, task_batches

MIN_DRAWS = 10          # random-head draws needed before a change may be called a gain (issue 18)
ACT_OPTIONS = {"beta": "ACT: scale of the sink columns (1 = unchanged; the paper: 0.4)",
               "tau": "sink rule 'tau': a key is a sink when its column mean exceeds tau",
               "rule": "sink rule: tau (the reference code) or alpha (mean > alpha/N, the paper's form)",
               "alpha": "sink rule 'alpha': the alpha of alpha/N",
               "min_queries": "keys seen by fewer queries are never sinks",
               "keep_first": "leave the first detected sink untouched (the reference code)"}


@dataclass(frozen=True)
class SinksConfig(Config):
    """The task, the ACT settings (the engine's ``SinkCalibration``) and the search protocol."""

    task: str = opt("sentiment", "sentiment, topic, qtype (data/sinks/), the same with @large (>= 200 "
                                    "generated held-out items) or a task file (.json, Task.save)")
    shots: int = opt(0, "demonstrations per label in each prompt", min=0)
    limit: int | None = opt(None, "use only the first N calibration and held-out items", min=1)
    act: SinkCalibration = opt(SinkCalibration(), "ACT settings", options=ACT_OPTIONS)
    selection: Literal["accuracy", "gold_logprob"] = opt(
        "accuracy", "head-selection rule: keep a head whose lone calibration improves accuracy (the paper) "
                    "or the gold label's log-probability")
    first_layer: int = opt(2, "first candidate layer (reference: 2)", min=0)
    last_layer: int | None = opt(None, "last candidate layer (default: L-2)", min=0)
    n_random: int = opt(10, "random-head control: number of seeds (heads drawn outside the kept set)", min=0)
    batch_size: int = opt(16, "prompts per forward", min=1)
    n_profile: int = opt(8, "held-out prompts profiled for sinks", min=1)

    def edit(self, heads=()) -> SinkCalibration:
        """The ACT edit with these settings on ``heads``."""
        return replace(self.act, heads=tuple(heads))

    def spec(self, heads) -> InterventionSpec:
        return act_spec(self.act, heads)

    @classmethod
    def small(cls, model) -> "SinksConfig":
        """Layers 2-3 (where the SmolLM2 validation found the heads ACT helps), kept by the gold label's
        log-probability: on the small split the accuracy rule keeps no head (one item moves it by 1/30).
        One random draw, so the verdict says a gain needs 10 (``n_random``)."""
        first = min(2, max(0, model.n_layers - 2))
        last = min(first + 1, max(0, model.n_layers - 2))
        return cls(n_profile=2, first_layer=first, last_layer=last, selection="gold_logprob", n_random=1)


def _task(cfg: SinksConfig):
    return load_task(cfg.task).limited(cfg.limit)


# ----------------------------------------------------------------------------- stage 1: profile

def plan_profile(model, cfg: SinksConfig, _) -> list[Unit]:
    families.family(model)                    # the search reruns from a layer: an unknown family is refused
    candidate_heads(model, cfg.first_layer, cfg.last_layer)          # bad layers fail before any work
    task = _task(cfg)
    label_token_ids(model.tokenizer, task.labels)
    texts = [task.prompt(it, 0) for it in task.split("heldout")[:cfg.n_profile]]
    return [Unit(f"text-{i:03d}", {"index": i, "text": t}) for i, t in enumerate(texts)]


def compute_profile(model, cfg: SinksConfig, unit: Unit, _) -> dict:
    sinks, mass = text_rows(model, unit.spec["index"], unit.spec["text"], cfg.act)
    return {"sinks": sinks, "mass": mass}


def reduce_profile(model, cfg: SinksConfig, payloads: dict, _) -> dict:
    rule = {"rule": cfg.act.rule, "tau": cfg.act.tau, "alpha": cfg.act.alpha, "min_queries": cfg.act.min_queries}
    sinks = [r for p in payloads.values() for r in p["sinks"]]
    mass = [r for p in payloads.values() for r in p["mass"]]
    return {"profile": SinkProfile.from_rows(model.model_id, model.weights_hash, rule, len(payloads), sinks, mass)}


# ----------------------------------------------------------------------------- stage 2: the search

def _batches(model, cfg: SinksConfig, split: str):
    task = _task(cfg)
    return task_batches(model, task, split, cfg.shots, cfg.batch_size), label_token_ids(model.tokenizer, task.labels)


def plan_search(model, cfg: SinksConfig, _) -> list[Unit]:
    key = _task(cfg).fingerprint()
    layers = sorted({h.layer for h in candidate_heads(model, cfg.first_layer, cfg.last_layer)})
    return [Unit("baseline", {"task": key})] + [Unit(f"layer-{l:03d}", {"task": key, "layer": l}) for l in layers]


def compute_search(model, cfg: SinksConfig, unit: Unit, _) -> dict:
    batches, label_ids = _batches(model, cfg, "calib")
    if "layer" not in unit.spec:
        return evaluate(model, batches, label_ids)
    return {"rows": scan_layer(model, batches, label_ids, cfg.act, unit.spec["layer"])}


def reduce_search(model, cfg: SinksConfig, payloads: dict, state: dict) -> dict:
    base = payloads["baseline"]
    rows = [r for uid, p in payloads.items() if uid != "baseline" for r in p["rows"]]
    return state | {"baseline": base, "candidates": rows, "selected": select_heads(base, rows, cfg.selection)}


# ----------------------------------------------------------------------------- stage 3: held-out evaluation

def _rules(cfg: SinksConfig) -> list[str]:
    """Both selection rules, the configured one first (it makes the calibration file)."""
    return [cfg.selection] + [m for m in METRICS if m != cfg.selection]


def plan_heldout(model, cfg: SinksConfig, state: dict) -> list[Unit]:
    """The plain model, then per selection rule its kept heads and ``n_random`` random sets outside them."""
    key, cands = _task(cfg).fingerprint(), candidate_heads(model, cfg.first_layer, cfg.last_layer)
    units = [Unit("plain", {"task": key, "heads": []})]
    for rule in _rules(cfg):
        kept = select_heads(state["baseline"], state["candidates"], rule)
        if not kept:
            continue
        pool, outside = control_pool(cands, kept)
        units.append(Unit(f"calibrated-{rule}", {"task": key, "heads": [str(h) for h in kept]}))
        units += [Unit(f"random-{rule}-{s:03d}", {"task": key, "seed": s, "outside": outside,
                                                   "heads": [str(h) for h in random_heads(pool, len(kept), s)]})
                  for s in range(cfg.n_random)]
    return units


def compute_heldout(model, cfg: SinksConfig, unit: Unit, _) -> dict:
    batches, label_ids = _batches(model, cfg, "heldout")
    spec = cfg.spec([HeadId.parse(h) for h in unit.spec["heads"]])
    items = item_outcomes(model, batches, label_ids, spec)
    return {m: float(sum(v) / len(v)) for m, v in items.items()} | {
        "items": items, "n_items": len(items["accuracy"]), "heads": unit.spec["heads"],
        "outside": unit.spec.get("outside", True)}


def _power(cfg: SinksConfig, payloads: dict, task_name: str) -> ActPower:
    rules = {}
    for rule in _rules(cfg):
        cal = payloads.get(f"calibrated-{rule}")
        ctrl = [p for uid, p in payloads.items() if uid.startswith(f"random-{rule}-")]
        rules[rule] = {"heads": cal["heads"] if cal else [], "calibrated": cal["items"] if cal else None,
                       "controls": [p["items"] for p in ctrl], "random_heads": [p["heads"] for p in ctrl],
                       "outside": all(p["outside"] for p in ctrl)}
    return judge(task_name, payloads["plain"]["items"], rules, cfg.to_dict() | {"task": task_name},
                 min_draws=MIN_DRAWS, seed=0)


def reduce_heldout(model, cfg: SinksConfig, payloads: dict, state: dict) -> SinksResult:
    score = ("accuracy", "gold_logprob")
    cal = payloads.get(f"calibrated-{cfg.selection}", payloads["plain"])
    held = {"plain": {k: payloads["plain"][k] for k in score}, "calibrated": {k: cal[k] for k in score},
            "random": [{"seed": int(uid.rsplit("-", 1)[1]), "heads": p["heads"], "outside": p["outside"],
                        **{k: p[k] for k in score}}
                       for uid, p in payloads.items() if uid.startswith(f"random-{cfg.selection}-")],
            "n_items": int(payloads["plain"]["n_items"])}
    name = _task(cfg).name
    search = SearchResult(model.model_id, model.weights_hash, name, cfg.to_dict(), state["baseline"],
                          state["candidates"], tuple(state["selected"]), held)
    calib = Calibration(model.model_id, model.weights_hash, cfg.edit(state["selected"]), search.task, search.figures())
    return SinksResult(model.model_id, state["profile"], search, calib, _power(cfg, payloads, name))


SINKS = Analysis(
    name="sinks", title="Sinks and calibration", order=20, icon=":material/tune:",
    description="A key is a sink of a head when its column-mean attention exceeds tau; ACT calibration scales the "
                "attention on the other sinks by beta in the heads whose lone calibration helps a task.",
    paper="Yu et al., ICML 2024, Unveiling and Harnessing Hidden Attention Sinks",
    url="https://arxiv.org/abs/2406.15765", methods="docs/methods.md §2",
    config=SinksConfig, result=SinksResult, min_samples=30,
    stages=(Stage("profile", plan_profile, compute_profile, reduce_profile, depends=("act",)),
            Stage("search", plan_search, compute_search, reduce_search, depends=("act", "shots", "batch_size")),
            Stage("heldout", plan_heldout, compute_heldout, reduce_heldout, depends=("act", "shots", "batch_size"))))
