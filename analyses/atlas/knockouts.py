"""Roles of the transfer matrix: which heads each analysis names, and how its own method knocks them out.

=================== =================================================== ==========================================
role                heads (k)                                           knock-out
=================== =================================================== ==========================================
``retrieval``       the scan's top-K by retrieval score (its masking K)  uniform attention on the rows that emit
                                                                        the scored tokens (Wu et al.: decoding)
``circuit.<task>``  that task's circuit (top ``frac`` of heads)          mean ablation (Merullo et al.)
``act``             the heads the ACT search kept                       the ACT calibration itself (its settings)
``grounding``       top-k by |Lookback Lens detector weight|            mean ablation
``sink``            top-k by first-token (sink) mass of the profile     mean ablation
``induction`` ...   top-k by a streaming score of :mod:`.repeats`       mean ablation
=================== =================================================== ==========================================

ACT has nothing to knock out: the model runs uncalibrated, so its cell measures what *applying*
the calibration to the kept heads does to every other task (``undo`` is the baseline). Mean
ablation replaces a head's output with its mean over the reference texts (every position but the
first, whose output is the sink's), the same vector on every task so that cells compare. The
control of every role is ``n_random`` sets of as many heads drawn in the same layers, outside the
role's heads (:func:`layer_matched`). Method: docs/methods.md §7.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from probe import InterventionSpec, MeanAblate, Uniform
from probe.errors import InputError
from probe.heads import HeadId

from ..circuits.patching import record_z
from .scores import Score

KNOCKOUTS = ("uniform", "mean", "act")


@dataclass(frozen=True)
class Role:
    """Heads of one role, how they are knocked out (``knockout``), and the rule that chose them."""

    name: str
    source: str
    heads: tuple[HeadId, ...]
    knockout: str
    rule: str
    act: dict | None = None            # the ACT edit's settings (knockout "act")

    def random_sets(self, layout, n: int) -> dict[str, tuple[HeadId, ...]]:
        """The control: ``r<seed>`` -> as many heads in the same layers, outside the role's heads."""
        return {f"r{s}": layer_matched(self.heads, layout, s, self.name) for s in range(n)}


def layer_matched(heads, layout, seed: int, what: str = "the role") -> tuple[HeadId, ...]:
    """As many random heads as ``heads``, each in the same layer as one of them (the nearest layer with a free
    head when a layer is full), none of ``heads``; seeded."""
    heads = sorted(set(heads))
    free = [h for h in layout.all_heads() if h not in set(heads)]
    if len(free) < len(heads):
        raise InputError(f"{what} has {len(heads)} heads and only {len(free)} lie outside it: no random set of the "
                         "same size exists; use a smaller k")
    rng = np.random.default_rng(seed)
    out: list[HeadId] = []
    for h in heads:
        pool = [x for x in free if x not in out]
        near = min(abs(x.layer - h.layer) for x in pool)
        pool = [x for x in pool if abs(x.layer - h.layer) == near]
        out.append(pool[int(rng.integers(len(pool)))])
    return tuple(sorted(out))


def knockout_spec(kind: str, heads, *, means: torch.Tensor | None = None, act: dict | None = None,
                  decode_only: bool = False) -> InterventionSpec:
    """The knock-out of ``heads``: uniform (``decode_only``: on decode rows), mean ablation, or ACT."""
    heads = tuple(heads)
    if not heads:
        return InterventionSpec()
    if kind == "uniform":
        return InterventionSpec([Uniform(heads=heads, phase="decode" if decode_only else "all")])
    if kind == "mean":
        return InterventionSpec([MeanAblate(heads=list(heads), values=[means[h.layer, h.head] for h in heads])])
    if kind == "act":
        from probe import SinkCalibration

        return InterventionSpec([replace(SinkCalibration(**act), heads=heads)])
    raise InputError(f"unknown knock-out {kind!r}: use one of {KNOCKOUTS}")


def mean_outputs(model, texts: list[torch.Tensor]) -> torch.Tensor:
    """Each head's mean output ``[layer, head, d_head]`` over ``texts`` (``[1, T]`` ids), position 0 left out."""
    total, count = None, 0
    for ids in texts:
        z = record_z(model, ids)[:, 0, 1:]                          # [L, T-1, H, D]
        total = z.sum(1) if total is None else total + z.sum(1)
        count += z.shape[1]
    if not count:
        raise InputError("the reference texts need at least two tokens each for the mean-ablation values")
    return total / count


# ----------------------------------------------------------------------------- the roles each analysis names

def _top(values: np.ndarray, k: int) -> tuple[HeadId, ...]:
    v = np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf)
    H = v.shape[1]
    order = np.argsort(-v, axis=None, kind="stable")[:k]
    return tuple(HeadId(int(i) // H, int(i) % H) for i in order if np.isfinite(v.flat[i]))


def _retrieval(res, k, scores):
    K = int(res.meta.get("k", k))
    heads = tuple(res.top) or _top(res.scores, K)
    return Role("retrieval", "retrieval", heads, "uniform", f"top-{len(heads)} retrieval score (the scan's masking K)")


def _act(res, k, scores):
    edit = res.calibration.edit
    settings = {f: getattr(edit, f) for f in ("beta", "tau", "rule", "alpha", "keep_first", "min_queries")}
    return Role("act", "sinks", tuple(res.search.selected), "act",
                f"the {len(res.search.selected)} heads the ACT search kept ({res.search.task}); calibrated "
                f"(beta {edit.beta})", settings)


def _grounding(res, k, scores):
    return Role("grounding", "grounding", _top(np.abs(res.head_weights), k), "mean",
                f"top-{k} |Lookback Lens detector weight|")


def _sink(res, k, scores):
    return Role("sink", "sinks", _top(res.head_scores()["mass:first"], k), "mean", f"top-{k} first-token mass")


def _circuit(task: str):
    def role(res, k, scores):
        names = [t.task for t in res.tasks]
        if task not in names:
            raise InputError(f"role circuit.{task}: the circuits result has no task {task!r} (it has {names}); "
                             f"rerun `headwise scan circuits --tasks {','.join(names + [task])}`")
        c = res.task(task).circuit
        return Role(f"circuit.{task}", "circuits", tuple(c), "mean", f"the {task} circuit ({len(c)} heads)")
    return role


def _streaming(name: str):
    def role(res, k, scores: dict[str, Score]):
        return Role(name, "atlas", _top(scores[f"atlas: {name}"].values, k), "mean", f"top-{k} {name} score")
    return role


# role -> (analysis whose result names the heads, or None for the atlas' own scores; the rule)
ROLE_SOURCES: dict[str, tuple[str | None, Callable]] = {
    "retrieval": ("retrieval", _retrieval), "act": ("sinks", _act), "grounding": ("grounding", _grounding),
    "sink": ("sinks", _sink), "induction": (None, _streaming("induction")),
    "previous_token": (None, _streaming("previous_token")), "duplicate_token": (None, _streaming("duplicate_token"))}


def resolve_role(name: str, results: dict, scores: dict[str, Score], k: int) -> Role:
    """The :class:`Role` ``name`` from the saved results (typed error naming what is missing)."""
    if name.startswith("circuit."):
        source, rule = "circuits", _circuit(name.split(".", 1)[1])
    elif name in ROLE_SOURCES:
        source, rule = ROLE_SOURCES[name]
    else:
        raise InputError(f"unknown role {name!r}: use one of {sorted(ROLE_SOURCES)} or circuit.<task>")
    if source is not None and source not in results:
        raise InputError(f"role {name!r} needs a saved {source} result: add {source} to --analyses "
                         f"(or run `headwise scan {source}`)")
    return rule(results.get(source), k, scores)
