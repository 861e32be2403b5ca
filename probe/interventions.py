"""Declarative per-head edits applied inside attention, and their JSON form.

An :class:`InterventionSpec` is a list of edits; each edit names its heads and when it acts
(``phase``: ``"all"``, ``"prefill"`` or ``"decode"``). Where each edit acts (its meaning is
defined by :mod:`probe.eager`):

============== ================= ===========================================================
edit           acts on           meaning
============== ================= ===========================================================
Uniform        scores            query set to 0: uniform attention over the visible keys
Temperature    scores            scores / t
SpanBoost      scores            z' = z + alpha*|z| on keys in ``spans`` (PAINT); rows "all"/"last"
SpanKnockout   scores            keys in ``spans`` masked out (a row never loses all its keys)
SinkCalibration pattern          ACT: sink columns scaled by beta, mass given back in proportion
PatternEcho    pattern           target head uses the source head's pattern (source layer < target)
ZeroAblate     head output z     z := 0
MeanAblate     head output z     z := given vector [d_head] or per-position values [T, d_head]
============== ================= ===========================================================

>>> spec = InterventionSpec([ZeroAblate(heads=("L0H1",)), Temperature(heads=("L1H0",), temperature=2.0)])
>>> InterventionSpec.from_json(spec.to_json()) == spec
True
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from .errors import CorruptFileError, InputError
from .heads import HeadId, HeadLayout, as_heads

PHASES = ("all", "prefill", "decode")


def _heads_field():
    return field(default=())


@dataclass(frozen=True)
class Edit:
    heads: tuple[HeadId, ...] = _heads_field()
    phase: str = "all"
    kind: ClassVar[str] = "edit"
    stage: ClassVar[str] = "scores"

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(as_heads(self.heads)))
        if self.phase not in PHASES:
            raise InputError(f"phase must be one of {PHASES}, not {self.phase!r}")
        self._validate()

    def _validate(self) -> None:
        pass

    def active(self, decoding: bool) -> bool:
        return self.phase == "all" or (self.phase == "decode") == decoding

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "heads":
                value = [str(h) for h in value]
            elif isinstance(value, torch.Tensor):
                value = {"shape": list(value.shape), "data": value.flatten().tolist()}
            d[f.name] = value
        return d


@dataclass(frozen=True)
class ZeroAblate(Edit):
    kind: ClassVar[str] = "zero_ablate"
    stage: ClassVar[str] = "output"


@dataclass(frozen=True, eq=False)
class MeanAblate(Edit):
    """Replace each head's output with ``values[head]``: ``[d_head]`` (a mean) or ``[T, d_head]`` (patching)."""

    values: tuple[torch.Tensor, ...] = ()
    kind: ClassVar[str] = "mean_ablate"
    stage: ClassVar[str] = "output"

    def __post_init__(self):
        heads = [HeadId.parse(h) if isinstance(h, str) else HeadId(*h) for h in self.heads]
        vals = tuple(torch.as_tensor(v, dtype=torch.float32) for v in self.values)
        if len(vals) != len(heads):
            raise InputError(f"MeanAblate needs one value per head: {len(heads)} heads, {len(vals)} values")
        order = sorted(range(len(heads)), key=lambda i: heads[i])
        object.__setattr__(self, "values", tuple(vals[i] for i in order))
        super().__post_init__()

    def __eq__(self, other):
        return (type(other) is MeanAblate and self.heads == other.heads and self.phase == other.phase
                and all(torch.equal(a, b) for a, b in zip(self.values, other.values)))

    __hash__ = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "heads": [str(h) for h in self.heads], "phase": self.phase,
                "values": [{"shape": list(v.shape), "data": v.flatten().tolist()} for v in self.values]}


@dataclass(frozen=True)
class Uniform(Edit):
    kind: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class Temperature(Edit):
    temperature: float = 1.0
    kind: ClassVar[str] = "temperature"

    def _validate(self):
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise InputError(f"temperature must be a positive number, not {self.temperature}")


@dataclass(frozen=True)
class SpanBoost(Edit):
    """PAINT-style boost ``z + alpha*|z|`` on keys in ``spans`` (half-open [start, stop))."""

    spans: tuple[tuple[int, int], ...] = ()
    alpha: float = 0.3
    rows: str = "all"
    kind: ClassVar[str] = "span_boost"

    def _validate(self):
        object.__setattr__(self, "spans", _spans(self.spans))
        if self.rows not in ("all", "last"):
            raise InputError(f"rows must be 'all' or 'last', not {self.rows!r}")


@dataclass(frozen=True)
class SpanKnockout(Edit):
    spans: tuple[tuple[int, int], ...] = ()
    rows: str = "all"
    kind: ClassVar[str] = "span_knockout"

    def _validate(self):
        object.__setattr__(self, "spans", _spans(self.spans))
        if self.rows not in ("all", "last"):
            raise InputError(f"rows must be 'all' or 'last', not {self.rows!r}")


@dataclass(frozen=True)
class SinkCalibration(Edit):
    """ACT (Yu et al. 2024): scale sink columns by ``beta`` and give the mass back in proportion.

    Sinks are ``sinks`` when given, else detected per forward from the column means of the head's
    pattern: ``rule="tau"`` keeps keys with mean > ``tau``; ``rule="alpha"`` keeps mean > alpha/N.
    Keys seen by fewer than ``min_queries`` queries are never sinks. The first detected sink is
    left untouched (``keep_first``), as the reference code does.
    """

    beta: float = 0.4
    tau: float = 0.1
    rule: str = "tau"
    alpha: float = 5.0
    sinks: tuple[int, ...] | None = None
    keep_first: bool = True
    min_queries: int = 1
    kind: ClassVar[str] = "sink_calibration"
    stage: ClassVar[str] = "pattern"

    def _validate(self):
        if not 0 < self.beta <= 1:
            raise InputError(f"beta must be in (0, 1], not {self.beta}: 1 leaves attention unchanged")
        if self.rule not in ("tau", "alpha"):
            raise InputError(f"sink rule must be 'tau' or 'alpha', not {self.rule!r}")
        if self.sinks is not None:
            object.__setattr__(self, "sinks", tuple(int(s) for s in self.sinks))


@dataclass(frozen=True)
class PatternEcho(Edit):
    """Each head in ``heads`` takes the pattern of ``source`` (an earlier layer's head) at the same rows."""

    source: HeadId | None = None
    kind: ClassVar[str] = "pattern_echo"
    stage: ClassVar[str] = "pattern"

    def _validate(self):
        if self.source is None:
            raise InputError("PatternEcho needs a source head, e.g. source='L3H1'")
        src = HeadId.parse(self.source) if isinstance(self.source, str) else HeadId(*self.source)
        object.__setattr__(self, "source", src)
        if any(h.layer <= src.layer for h in self.heads):
            raise InputError(f"PatternEcho source {src} must be in an earlier layer than every target")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["source"] = str(self.source)
        return d


EDIT_TYPES: dict[str, type[Edit]] = {cls.kind: cls for cls in (
    ZeroAblate, MeanAblate, Uniform, Temperature, SpanBoost, SpanKnockout, SinkCalibration, PatternEcho)}


@dataclass(frozen=True)
class InterventionSpec:
    """An ordered list of edits; serialisable to JSON and checked against a model's layout.

    >>> spec = InterventionSpec([ZeroAblate(heads=["L0H1"]), SpanBoost(heads=["L1H0"], spans=[(0, 2)], alpha=0.5)])
    >>> spec.heads()
    [L0H1, L1H0]
    >>> InterventionSpec.from_json(spec.to_json()) == spec
    True
    """

    edits: tuple[Edit, ...] = ()

    def __init__(self, edits=()):
        object.__setattr__(self, "edits", tuple(edits))

    def __bool__(self) -> bool:
        return bool(self.edits)

    def __add__(self, other: "InterventionSpec") -> "InterventionSpec":
        return InterventionSpec(self.edits + other.edits)

    def heads(self) -> list[HeadId]:
        return sorted({h for e in self.edits for h in e.heads})

    def validate(self, layout: HeadLayout) -> "InterventionSpec":
        for e in self.edits:
            for h in e.heads:
                layout.check(h)
            if isinstance(e, PatternEcho):
                layout.check(e.source)
        return self

    def to_dict(self) -> dict:
        return {"format": "headwise.interventions", "version": 1, "edits": [e.to_dict() for e in self.edits]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionSpec":
        if not isinstance(d, dict) or d.get("format") != "headwise.interventions":
            raise CorruptFileError("not a headwise intervention spec (missing format 'headwise.interventions')")
        return cls(edit_from_dict(e) for e in d.get("edits", []))

    @classmethod
    def from_json(cls, text: str) -> "InterventionSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"intervention spec is not valid JSON: {exc}") from exc


def edit_from_dict(d: dict) -> Edit:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in EDIT_TYPES:
        raise CorruptFileError(f"unknown edit kind {kind!r}: expected one of {sorted(EDIT_TYPES)}")
    if kind == "mean_ablate":
        d["values"] = tuple(torch.tensor(v["data"], dtype=torch.float32).reshape(v["shape"]) for v in d["values"])
    if "spans" in d:
        d["spans"] = tuple(tuple(s) for s in d["spans"])
    if d.get("sinks") is not None:
        d["sinks"] = tuple(d["sinks"])
    try:
        return EDIT_TYPES[kind](**d)
    except TypeError as exc:
        raise CorruptFileError(f"bad fields for edit {kind!r}: {exc}") from exc


def _spans(spans) -> tuple[tuple[int, int], ...]:
    out = []
    for s in spans:
        start, stop = (int(x) for x in s)
        if not 0 <= start < stop:
            raise InputError(f"span {s} is empty or negative: write spans as (start, stop) with 0 <= start < stop")
        out.append((start, stop))
    return tuple(out)
