"""ACT with power: held-out before/after per item, both selection rules, random heads outside the set.

The head search (:mod:`.search`) keeps the heads whose lone calibration improves a metric on the
calibration split. This module judges the kept set on the *held-out* split, item by item
(docs/methods.md §2, "Statistics"):

* both selection rules: the paper's accuracy rule (a head is kept when calibration-split accuracy
  rises) and the gold log-probability rule (finer on small splits); each gives its own head set;
* per item: correct (0/1) and the gold label's log-probability, plain vs calibrated, so every
  before/after has a paired bootstrap interval and a paired test (exact McNemar for accuracy,
  sign-flip permutation for log-probability);
* ``n_random`` (>= 10) random head sets of the same size, drawn from the candidates **outside** the
  selected set; a change is called a gain only when it beats the random control's upper interval
  bound (:func:`analyses.inference.call_gain`).

The search is the sinks analysis' own ``search`` stage (:data:`analyses.sinks.SINKS`, its units
stored and resumed under ``out``); the ACT settings and the candidate layers come from a
:class:`~analyses.sinks.SinksConfig`.

>>> from probe import load_model
>>> from analyses.sinks import SinksConfig
>>> r = act_power(load_model("tiny-llama"), "sentiment", SinksConfig(first_layer=0, last_layer=0),
...               n_random=2, min_draws=2, progress=False)      # "sentiment@large": 240 held-out items
>>> sorted(r.rules), r.n_heldout
(['accuracy', 'gold_logprob'], 30)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from probe import HeadId
from probe.errors import InputError

from .. import inference as inf
from .search import METRICS, SearchResult, candidate_heads, random_heads, select_heads
from .search import item_outcomes as search_items
from .tasks import Task, label_token_ids, load_task, task_batches

if TYPE_CHECKING:
    from .run import SinksConfig


def item_outcomes(model, task, cfg: "SinksConfig", heads, split: str = "heldout") -> dict[str, np.ndarray]:
    """Per item of ``split``: ``accuracy`` (0/1) and ``gold_logprob``, with ``heads`` calibrated (none: plain)."""
    batches = task_batches(model, task, split, cfg.shots, cfg.batch_size)
    out = search_items(model, batches, label_token_ids(model.tokenizer, task.labels), cfg.spec(list(heads)))
    return {m: np.asarray(v, np.float64) for m, v in out.items()}


def random_outside(candidates: list[HeadId], selected, k: int, seed: int) -> list[HeadId]:
    """``k`` heads drawn (seeded) from ``candidates`` outside ``selected``."""
    kept = set(selected)
    pool = [h for h in candidates if h not in kept]
    if len(pool) <= k:          # k of k: every seed would draw the same set (no random control at all)
        raise InputError(f"only {len(pool)} candidate heads lie outside the {k} selected ones, so every seed "
                         "draws the same set: widen the candidate layers (first_layer/last_layer) for a random "
                         "control of that size")
    return random_heads(pool, k, seed)


@dataclass(frozen=True, eq=False)
class ActPower:
    """Held-out judgement of ACT on one task: per rule, the kept heads and a verdict per metric."""

    task: str
    n_heldout: int
    plain: dict                # metric -> Interval dict (accuracy: Wilson; log-prob: bootstrap)
    rules: dict                # rule -> {"heads", "calibrated": {metric: Interval dict},
                               #          "verdicts": {metric: GainVerdict dict}, "random_heads": [[...]],
                               #          "outside": the controls avoided the kept heads}
    config: dict

    def to_frame(self) -> pd.DataFrame:
        """One row per rule, metric and quantity (plain, calibrated, gain, random control)."""
        rows = [{"rule": "-", "metric": m, "quantity": "plain", **iv} for m, iv in self.plain.items()]
        for rule, r in self.rules.items():
            for m in METRICS:
                if m in r["calibrated"]:
                    rows.append({"rule": rule, "metric": m, "quantity": "calibrated", **r["calibrated"][m]})
                v = r["verdicts"].get(m)
                if v:
                    rows.append({"rule": rule, "metric": m, "quantity": "gain", **v["gain"],
                                 "p_value": v["p_value"], "is_gain": v["is_gain"]})
                    rows.append({"rule": rule, "metric": m, "quantity": "random_gain", **v["control"]})
        return pd.DataFrame(rows)

    def plot(self, metric: str = "accuracy"):
        """Gain of each rule's heads vs the random control's gain, with intervals."""
        import plotly.graph_objects as go

        df = self.to_frame()
        df = df[(df.metric == metric) & df.quantity.isin(["gain", "random_gain"])]
        fig = go.Figure()
        for q, name in (("gain", "selected heads"), ("random_gain", "random heads (outside)")):
            d = df[df.quantity == q]
            fig.add_bar(x=d.rule, y=d.estimate, name=name,
                        error_y={"type": "data", "symmetric": False, "array": d.hi - d.estimate,
                                 "arrayminus": d.estimate - d.lo})
        return fig.update_layout(title=f"ACT held-out change in {metric} ({self.task}, n={self.n_heldout})",
                                 yaxis_title=f"change in {metric}", barmode="group")

    def to_dict(self) -> dict:
        return {"format": "headwise.act_power", "version": 1, "task": self.task, "n_heldout": self.n_heldout,
                "plain": self.plain, "rules": self.rules, "config": self.config}

    def save(self, path) -> Path:
        from probe.atomic import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path) -> "ActPower":
        from probe.atomic import read_json
        from probe.errors import CorruptFileError

        d = read_json(path, "ACT power result")
        if not isinstance(d, dict) or d.get("format") != "headwise.act_power":
            raise CorruptFileError(f"{path} is not a headwise ACT power result: rerun act_power")
        return cls(d["task"], int(d["n_heldout"]), d["plain"], d["rules"], d["config"])


def _interval(metric: str, x: np.ndarray, seed: int) -> dict:
    if metric == "accuracy":
        return inf.wilson(int(x.sum()), len(x)).to_dict()
    return inf.mean_ci(x, seed=seed).to_dict()


def judge(task_name: str, plain: dict, rules: dict, config: dict, *, min_draws: int = 10,
          seed: int = 0) -> ActPower:
    """The verdicts from per-item outcomes: ``plain`` {metric: [items]}; ``rules`` rule -> {"heads",
    "calibrated": {metric: [items]} or None, "controls": [{metric: [items]}, ...], "random_heads",
    "outside"} (the held-out stage of :data:`~analyses.sinks.SINKS` and :func:`heldout_power` both end here)."""
    plain = {m: np.asarray(plain[m], np.float64) for m in METRICS}
    out = {}
    for rule, r in rules.items():
        entry = {"heads": [str(h) for h in r["heads"]], "calibrated": {}, "verdicts": {},
                 "random_heads": [[str(h) for h in hs] for hs in r.get("random_heads", [])],
                 "outside": bool(r.get("outside", True))}
        if r["heads"] and r.get("calibrated") is not None:
            for m in METRICS:
                cal = np.asarray(r["calibrated"][m], np.float64)
                entry["calibrated"][m] = _interval(m, cal, seed)
                if r.get("controls"):
                    controls = np.stack([np.asarray(c[m], np.float64) for c in r["controls"]])
                    entry["verdicts"][m] = inf.call_gain(plain[m], cal, controls, min_draws=min_draws,
                                                         seed=seed).to_dict()
        out[rule] = entry
    return ActPower(task_name, len(plain["accuracy"]), {m: _interval(m, plain[m], seed) for m in METRICS}, out,
                    config | {"task": task_name, "min_draws": min_draws, "seed": seed})


def heldout_power(model, task, cfg: "SinksConfig", selections: dict[str, list[HeadId]], *, n_random: int = 10,
                  min_draws: int = 10, seed: int = 0, progress: bool = True) -> ActPower:
    """Judge each rule's head set on the held-out split against ``n_random`` random sets outside it."""
    plain = item_outcomes(model, task, cfg, [])
    cands, rules = candidate_heads(model, cfg.first_layer, cfg.last_layer), {}
    for rule, heads in selections.items():
        rules[rule] = {"heads": heads, "calibrated": None, "controls": [], "random_heads": []}
        if heads:
            draws = [random_outside(cands, heads, len(heads), seed + d) for d in range(n_random)]
            rules[rule] |= {"calibrated": item_outcomes(model, task, cfg, heads), "random_heads": draws,
                            "controls": [item_outcomes(model, task, cfg, h)
                                         for h in tqdm(draws, desc=f"random control ({rule})", disable=not progress)]}
    return judge(task.name, plain, rules, cfg.to_dict() | {"n_random": n_random}, min_draws=min_draws, seed=seed)


def act_power(model, task, cfg: "SinksConfig | None" = None, *, n_random: int = 10, min_draws: int = 10,
              out=None, progress: bool = True) -> ActPower:
    """Search on the calibration split, then judge both rules' head sets on held-out items.

    ``task``: a task or its name (``"sentiment@large"`` for the >= 200-item held-out split; it
    replaces ``cfg.task``; ``cfg.limit`` applies). ``cfg``: the ACT settings and candidate layers
    (default: :class:`SinksConfig`'s). ``out``: a folder; the search's units are stored (and resumed)
    in ``search_<task>/`` there, its result is saved as ``search_<task>.json`` and the judgement as
    ``power_<task>.json``.
    """
    from .run import SinksConfig

    cfg = cfg or SinksConfig()
    task = (load_task(task) if isinstance(task, str) else task).limited(cfg.limit)
    res = search(model, task, cfg, out=out, progress=progress)
    selections = {m: select_heads(res.baseline, res.candidates, m) for m in METRICS}
    power = heldout_power(model, task, cfg, selections, n_random=n_random, min_draws=min_draws, progress=progress)
    if out:
        rule = power.rules[cfg.selection]
        held = {"plain": {m: power.plain[m]["estimate"] for m in METRICS},
                "calibrated": {m: rule["calibrated"].get(m, power.plain[m])["estimate"] for m in METRICS},
                "random": [], "n_items": power.n_heldout}      # the control is the judgement's, outside the set
        replace(res, heldout=held).save(Path(out) / f"search_{task.name}.json")
        power.save(Path(out) / f"power_{task.name}.json")
    return power


def search(model, task: Task, cfg: "SinksConfig", *, out=None, progress: bool = True) -> SearchResult:
    """The ``search`` stage of :data:`~analyses.sinks.SINKS` on ``task`` (held-out scores left empty).

    The stage reads its task from ``cfg.task``, so ``task`` is written as a task file beside its units
    (``out/search_<task>/task.json``, or a temporary folder without ``out``)."""
    import tempfile

    from ..runner import run_stage
    from ..units import UnitStore
    from .run import SINKS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) / f"search_{task.name}" if out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = task.save(folder / "task.json")
        run_cfg = replace(cfg, task=str(path))
        state = run_stage(SINKS, SINKS.stage("search"), model, run_cfg, {}, UnitStore(folder) if out else None,
                          progress=progress)
    return SearchResult(model.model_id, model.weights_hash, task.name, cfg.to_dict() | {"task": task.name}, state["baseline"],
                        state["candidates"], tuple(state["selected"]), {})
