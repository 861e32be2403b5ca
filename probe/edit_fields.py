"""Checks for the fields of intervention edits, shared by the constructors and the JSON parser.

Each check returns the value in its canonical form or raises :class:`~probe.errors.InputError`
whose message starts with the field's name (the JSON parser puts the edit in front, e.g.
``edits[2] (span_boost): alpha must be a finite number, not nan``).

>>> number("alpha", 0.5), spans([[0, 2]]), heads(["L1H0", (0, 3)])
(0.5, ((0, 2),), (L0H3, L1H0))
"""
from __future__ import annotations

import math

import torch

from .errors import InputError
from .heads import HeadId, as_heads


def number(name: str, value, *, above: float | None = None, at_least: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    if above is not None and not value > above:
        raise InputError(f"{name} must be greater than {above:g}, not {value!r}")
    if at_least is not None and not value >= at_least:
        raise InputError(f"{name} must be at least {at_least:g}, not {value!r}")
    return float(value)


def integer(name: str, value, *, at_least: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, not {value!r}")
    if at_least is not None and value < at_least:
        raise InputError(f"{name} must be at least {at_least}, not {value!r}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise InputError(f"{name} must be one of {options}, not {value!r}")
    return value


def as_list(name: str, value) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise InputError(f"{name} must be a list, not {type(value).__name__} {value!r:.80}")
    return list(value)


def heads(items, *, keep_order: bool = False, what: str = "heads") -> tuple[HeadId, ...]:
    """``"L3H7"`` strings, ``(layer, head)`` pairs or HeadIds, as HeadIds (sorted unless ``keep_order``)."""
    out = []
    for x in as_list(what, items):
        if isinstance(x, str):
            try:
                out.append(HeadId.parse(x))
            except InputError as exc:
                raise InputError(f"{what}: {exc}") from None
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            out.append(HeadId(*(integer(what, v, at_least=0) for v in x)))
        else:
            raise InputError(f"{what}: {x!r} is not a head: write heads as 'L3H7' or [layer, head]")
    return tuple(out) if keep_order else tuple(as_heads(out))


def spans(spans) -> tuple[tuple[int, int], ...]:
    out = []
    for s in as_list("spans", spans):
        pair = [integer("spans", v) for v in as_list("spans", s)]
        if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
            raise InputError(f"spans: {s!r} is not a span: write spans as (start, stop) with 0 <= start < stop")
        out.append((pair[0], pair[1]))
    return tuple(out)


def values(values) -> list[torch.Tensor]:
    out = []
    for i, v in enumerate(as_list("values", values)):
        try:
            t = torch.as_tensor(v, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"values[{i}] is not numbers ({exc})") from None
        if t.dim() not in (1, 2) or not t.numel():
            raise InputError(f"values[{i}] has shape {tuple(t.shape)}: give [d_head] or [positions, d_head]")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"values[{i}] holds non-finite numbers")
        out.append(t)
    return out


def tensor_from_json(v, name: str) -> torch.Tensor:
    if not isinstance(v, dict) or set(v) != {"shape", "data"}:
        raise InputError(f"{name} must be an object with 'shape' and 'data', not {v!r:.80}")
    shape = [integer(f"{name}.shape", n, at_least=0) for n in as_list(f"{name}.shape", v["shape"])]
    data = [number(f"{name}.data", x) for x in as_list(f"{name}.data", v["data"])]
    if math.prod(shape) != len(data):
        raise InputError(f"{name}: shape {shape} needs {math.prod(shape)} numbers, data has {len(data)}")
    return torch.tensor(data, dtype=torch.float32).reshape(shape)
