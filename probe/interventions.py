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
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from . import edit_fields
from .errors import HeadOutOfRangeError, InputError, SpecError
from .heads import HeadId, HeadLayout

PHASES = ("all", "prefill", "decode")
FORMAT = "headwise.interventions"
VERSIONS = (1,)  # spec format versions this headwise reads


def _heads_field():
    return field(default=())


@dataclass(frozen=True)
class Edit:
    heads: tuple[HeadId, ...] = _heads_field()
    phase: str = "all"
    kind: ClassVar[str] = "edit"
    stage: ClassVar[str] = "scores"

    def __post_init__(self):
        object.__setattr__(self, "heads", edit_fields.heads(self.heads))
        if not isinstance(self.phase, str) or self.phase not in PHASES:
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
        heads = list(edit_fields.heads(self.heads, keep_order=True))
        if len(set(heads)) != len(heads):
            raise InputError(f"heads: {heads} name a head twice; MeanAblate takes one value per head")
        vals = tuple(edit_fields.values(self.values))
        if len(vals) != len(heads):
            raise InputError(f"values: MeanAblate needs one value per head: {len(heads)} heads, {len(vals)} values")
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
        edit_fields.number("temperature", self.temperature, above=0)


@dataclass(frozen=True)
class SpanBoost(Edit):
    """PAINT-style boost ``z + alpha*|z|`` on keys in ``spans`` (half-open [start, stop))."""

    spans: tuple[tuple[int, int], ...] = ()
    alpha: float = 0.3
    rows: str = "all"
    kind: ClassVar[str] = "span_boost"

    def _validate(self):
        object.__setattr__(self, "spans", edit_fields.spans(self.spans))
        edit_fields.choice("rows", self.rows, ("all", "last"))
        edit_fields.number("alpha", self.alpha)


@dataclass(frozen=True)
class SpanKnockout(Edit):
    spans: tuple[tuple[int, int], ...] = ()
    rows: str = "all"
    kind: ClassVar[str] = "span_knockout"

    def _validate(self):
        object.__setattr__(self, "spans", edit_fields.spans(self.spans))
        edit_fields.choice("rows", self.rows, ("all", "last"))


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
        beta = edit_fields.number("beta", self.beta, above=0)
        if beta > 1:
            raise InputError(f"beta must be in (0, 1], not {beta}: 1 leaves attention unchanged")
        edit_fields.number("tau", self.tau, at_least=0)
        edit_fields.number("alpha", self.alpha, above=0)
        edit_fields.choice("rule", self.rule, ("tau", "alpha"))
        if not isinstance(self.keep_first, bool):
            raise InputError(f"keep_first must be true or false, not {self.keep_first!r}")
        edit_fields.integer("min_queries", self.min_queries, at_least=1)
        if self.sinks is not None:
            sinks = edit_fields.as_list("sinks", self.sinks)
            object.__setattr__(self, "sinks", tuple(edit_fields.integer("sinks", i, at_least=0) for i in sinks))


@dataclass(frozen=True)
class PatternEcho(Edit):
    """Each head in ``heads`` takes the pattern of ``source`` (an earlier layer's head) at the same rows."""

    source: HeadId | None = None
    kind: ClassVar[str] = "pattern_echo"
    stage: ClassVar[str] = "pattern"

    def _validate(self):
        if self.source is None:
            raise InputError("source: PatternEcho needs a source head, e.g. source='L3H1'")
        src = edit_fields.heads([self.source], what="source")[0]
        object.__setattr__(self, "source", src)
        if any(h.layer <= src.layer for h in self.heads):
            raise InputError(f"source: PatternEcho source {src} must be in an earlier layer than every target")

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

    def validate(self, layout: HeadLayout, *, n_ctx: int | None = None) -> "InterventionSpec":
        """Check every edit against the model it is applied to: heads in range, positions within ``n_ctx``."""
        for i, e in enumerate(self.edits):
            where = f"edits[{i}] ({e.kind})"
            try:
                for h in e.heads + ((e.source,) if isinstance(e, PatternEcho) else ()):
                    layout.check(h)
            except HeadOutOfRangeError as exc:
                raise HeadOutOfRangeError(f"{where}: {exc}") from None
            if n_ctx is not None:
                _check_positions(e, n_ctx, where)
        return self

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "edits": [e.to_dict() for e in self.edits]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionSpec":
        """Parse the JSON form; any problem is a :class:`SpecError` naming the edit and the field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SpecError(f"not a headwise intervention spec (missing format {FORMAT!r})")
        if d.get("version", 1) not in VERSIONS:
            raise SpecError(f"intervention spec version {d.get('version')!r} is not one this headwise reads "
                            f"({', '.join(map(str, VERSIONS))}): write it again with this headwise")
        unknown = sorted(set(d) - {"format", "version", "edits"})
        if unknown:
            raise SpecError(f"intervention spec: unknown field(s) {unknown}; a spec has format, version and edits")
        edits = d.get("edits", [])
        if not isinstance(edits, list):
            raise SpecError(f"intervention spec: edits must be a list, not {type(edits).__name__}")
        return cls(edit_from_dict(e, where=f"edits[{i}]") for i, e in enumerate(edits))

    @classmethod
    def from_json(cls, text: str) -> "InterventionSpec":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise SpecError(f"intervention spec is not valid JSON: {exc}") from exc
        return cls.from_dict(d)


def edit_from_dict(d: dict, where: str = "edit") -> Edit:
    """One edit from its JSON form (``where`` names it in errors, e.g. ``edits[2]``)."""
    if not isinstance(d, dict):
        raise SpecError(f"{where}: an edit is an object with a 'kind', not {type(d).__name__} {d!r:.80}")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in EDIT_TYPES:
        raise SpecError(f"{where}: unknown edit kind {kind!r}: expected one of {sorted(EDIT_TYPES)}")
    cls, where = EDIT_TYPES[kind], f"{where} ({kind})"
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known - {"kind"})
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; {kind} takes {sorted(known)}")
    kwargs = {k: v for k, v in d.items() if k != "kind"}
    try:
        if kind == "mean_ablate":
            kwargs["values"] = tuple(edit_fields.tensor_from_json(v, f"values[{i}]")
                                     for i, v in enumerate(edit_fields.as_list("values", kwargs.get("values", []))))
        return cls(**kwargs)
    except InputError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _check_positions(e: Edit, n_ctx: int, where: str) -> None:
    """Positions an edit names (spans, sinks, patched positions) must exist in a context of ``n_ctx``."""
    for start, stop in getattr(e, "spans", ()):
        if stop > n_ctx:
            raise SpecError(f"{where}: spans: ({start}, {stop}) reaches past the model's context of {n_ctx} tokens")
    for s in getattr(e, "sinks", None) or ():
        if s >= n_ctx:
            raise SpecError(f"{where}: sinks: position {s} is past the model's context of {n_ctx} tokens")
    for i, v in enumerate(getattr(e, "values", ())):
        if v.dim() == 2 and v.shape[0] > n_ctx:
            raise SpecError(f"{where}: values[{i}] covers {v.shape[0]} positions, the model's context is {n_ctx}")
