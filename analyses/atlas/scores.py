"""The per-head scores the study compares, gathered from saved results through the result contract.

A :class:`Score` is one ``[layer, head]`` map with, where the analysis kept them, its per-item values
(``Result.item_scores()``: samples, prompts, texts) so that intervals can resample the items behind
it; scores with the same ``item_key`` were measured on the same items and are resampled together.
``kind`` says how the score may be compared: ``continuous``, ``binary`` (a selected set),
``layer`` (one value per layer, copied to its heads: no head set, and a correlation that only
ranks layers) or ``categorical`` (labels, compared by the share of rank variance they explain).

Which scores of each analysis enter the study is the table :data:`SELECT` (one small function per
analysis, reading its result's ``head_scores()``/``item_scores()``); an analysis without an entry
(a plugin) contributes every head score, head-level only. Method: docs/methods.md §7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..contract import Result

KINDS = ("continuous", "binary", "layer", "categorical")


@dataclass(frozen=True, eq=False)
class Score:
    """One per-head score (see the module docstring); ``absolute``: compare ``|mean|`` (signed effects)."""

    name: str
    source: str
    values: np.ndarray                     # [layer, head], NaN where undefined
    items: np.ndarray | None = None        # [item, layer, head] whose mean is `values` (before `absolute`)
    item_key: str = ""
    kind: str = "continuous"
    absolute: bool = False
    label: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"score kind must be one of {KINDS}, not {self.kind!r}")
        v = np.asarray(self.values, np.float64)
        object.__setattr__(self, "values", np.abs(v) if self.absolute else v)

    @property
    def n_items(self) -> int:
        return 0 if self.items is None else int(len(self.items))

    def flat(self) -> np.ndarray:
        return self.values.ravel()

    def resampled(self, idx: np.ndarray) -> np.ndarray:
        """Head values from the items ``idx`` ``[draws, n]`` -> ``[draws, layer * head]``."""
        X = self.items.reshape(len(self.items), -1)
        out = np.stack([X[i].mean(0) for i in idx])
        return np.abs(out) if self.absolute else out


def _scores(res: Result, picks) -> list[Score]:
    """``picks``: ``(name, head_scores key, kind, absolute, item_key)``; keys the result lacks are skipped."""
    maps, items = res.head_scores(), res.item_scores()
    out = []
    for name, key, kind, absolute, item_key in picks:
        if key in maps:
            it = items.get(key)
            out.append(Score(name, "", maps[key], it, item_key if it is not None else "", kind, absolute))
    return out


def _retrieval(res) -> list[Score]:
    return _scores(res, [("retrieval score", "retrieval_score", "continuous", False, "retrieval:samples")])


def _sinks(res) -> list[Score]:
    task = res.search.task
    return _scores(res, [("sink mass (first token)", "mass:first", "continuous", False, "sinks:profile"),
                         ("ACT selected", f"{task} search: selected", "binary", False, ""),
                         ("ACT gain (gold log-prob)", f"{task} search: delta_gold_logprob", "continuous", False, "")])


def _circuits(res) -> list[Score]:
    return _scores(res, [(f"{t.task} |effect|", f"{t.task}: score_exact", "continuous", True, f"circuits:{t.task}")
                         for t in res.tasks])


def _similarity(res) -> list[Score]:
    out = [Score("cos to next layer", "", res.cos_next())]
    variant = next((v for v in ("matched", "same") if v in res.echo), None)
    if variant is not None:                      # layer l+1 reusing layer l's pattern costs echo[l] nats
        cost = np.full((res.n_layers, res.n_heads), np.nan)
        cost[1:] = np.asarray(res.echo[variant], np.float64)[:, None]
        out.append(Score(f"echo cost ({variant})", "", cost, kind="layer"))
    out.append(Score("family", "", res.families.reshape(res.n_layers, res.n_heads).astype(float), kind="categorical"))
    return out


def _grounding(res) -> list[Score]:
    return [Score("|detector weight|", "", res.head_weights, absolute=True)]


SELECT: dict[str, Callable[[Result], list[Score]]] = {
    "retrieval": _retrieval, "sinks": _sinks, "circuits": _circuits, "similarity": _similarity,
    "grounding": _grounding}


def result_scores(name: str, res: Result) -> list[Score]:
    """The study's scores of one saved result, named ``"<analysis>: <score>"``."""
    picked = SELECT[name](res) if name in SELECT else \
        [Score(k, "", v) for k, v in res.head_scores().items()]
    return [Score(f"{name}: {s.name}", name, s.values, s.items, s.item_key, s.kind, s.absolute, s.label)
            for s in picked]


def repeat_scores(items: dict[str, np.ndarray], labels: dict[str, str]) -> list[Score]:
    """The streaming role scores (:mod:`.repeats`), one item per repeated sequence."""
    return [Score(f"atlas: {k}", "atlas", v.mean(0), v, "atlas:sequences", label=labels.get(k, ""))
            for k, v in items.items()]
