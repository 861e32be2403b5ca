"""Analysis settings: frozen dataclasses whose fields say their type, default, help and range.

Every analysis has one config class (a frozen dataclass deriving from :class:`Config`). Its
defaults are the full, published-style run; :meth:`Config.small` is the first run the dashboard
offers (minutes on a laptop CPU). The field annotations are the single source of the options:
:func:`options` turns them into typed :class:`Option` s from which the CLI flags
(:func:`add_arguments`), the dashboard's forms and the notebook snippets are generated, and
:func:`build` turns ``{name: value}`` back into a validated config.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]`` (comma-separated on the command line; ``X`` may be a ``Literal``) and ``tuple[tuple[A, B, C], ...]``
(``a:b:c,a:b:c``); a nested frozen dataclass field exposes the inner fields its ``opt(...,
options=(...))`` names.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo(Config):
...     k: int = opt(10, "heads masked", min=1)
...     depths: tuple[float, ...] = opt((0.0, 50.0), "needle depths in percent")
>>> [o.name for o in options(Demo)], build(Demo, {"k": "3", "depths": "10,20"})
(['k', 'depths'], Demo(k=3, depths=(10.0, 20.0)))
>>> Demo(k=0)
Traceback (most recent call last):
...
probe.errors.InputError: k must be >= 1, got 0 (flag --k): use 1 or more

Every message names the field, its flag, the value and the fix; the CLI, the dashboard's forms and
the Python API share these checks, and bad flags fail before any model loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from probe.errors import InputError

_NONE = ("", "none", "None")


def opt(default, help: str, *, min=None, max=None, options: dict[str, str] | None = None):
    """A config field: default, help text (CLI flag and form widget), allowed range.

    For a nested frozen dataclass (e.g. the engine's ``SinkCalibration``), ``options`` maps the inner
    fields exposed as options to their help texts.
    """
    return field(default=default, metadata={"help": help, "min": min, "max": max, "options": options})


class Config:
    """Base of analysis configs: type, choice and range checks at construction; the small variant."""

    def __post_init__(self):
        for o in options(type(self)):
            value = _get(self, o.path)
            fixed = check(o, value)
            if fixed is not value:                    # normalised (a list became a tuple, an int a float)
                object.__setattr__(self, o.path[0], fixed if len(o.path) == 1 else
                                   _replace(getattr(self, o.path[0]), o.path[1:], fixed))
        self.check()

    def check(self) -> None:
        """Checks across fields (override where an analysis has them)."""

    @classmethod
    def small(cls, model) -> "Config":
        """The first run the dashboard offers on ``model`` (override: minutes, not hours)."""
        return cls()

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))


@dataclass(frozen=True)
class Option:
    """One setting of a config: where it lives (``path``), its flag name, type and documentation."""

    path: tuple[str, ...]
    name: str
    kind: str                    # bool | int | float | str | choice | list
    item: tuple = ()             # list: the element type(s); (int,) or (str, int, float) for tuples
    choices: tuple = ()
    optional: bool = False
    default: Any = None
    help: str = ""
    min: Any = None
    max: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def options(cls) -> list[Option]:
    """The options of a config class, in field order (nested dataclass fields flattened)."""
    return _options(cls, (), None)


def _options(cls, prefix: tuple[str, ...], only) -> list[Option]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or (only is not None and f.name not in only):
            continue
        t, meta = hints[f.name], f.metadata
        if dataclasses.is_dataclass(t) and meta.get("options"):
            out += _options(t, prefix + (f.name,), meta["options"])
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if only is not None:                       # a nested field: its help comes from the outer opt()
            meta = {"help": only[f.name]}
        out.append(_option(prefix + (f.name,), t, default, meta))
    return out


def _option(path, t, default, meta) -> Option:
    optional = False
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t):
        optional, t = True, next(a for a in typing.get_args(t) if a is not type(None))
    kw = {"path": path, "name": path[-1], "optional": optional, "default": default,
          "help": meta.get("help", ""), "min": meta.get("min"), "max": meta.get("max")}
    if typing.get_origin(t) is Literal:
        return Option(kind="choice", choices=typing.get_args(t), **kw)
    if typing.get_origin(t) is tuple:
        inner = typing.get_args(t)[0]
        if typing.get_origin(inner) is Literal:          # a list of choices, e.g. tuple[Literal["a", "b"], ...]
            return Option(kind="list", item=(str,), choices=typing.get_args(inner), **kw)
        item = typing.get_args(inner) if typing.get_origin(inner) is tuple else (inner,)
        return Option(kind="list", item=item, **kw)
    if t in (bool, int, float, str):
        return Option(kind=t.__name__, **kw)
    raise TypeError(f"config field {'.'.join(path)}: unsupported type {t!r}")


# ----------------------------------------------------------------------------- values

def parse(o: Option, text: str):
    """The value of ``o`` written as ``text`` (a flag's argument or a form's text box)."""
    text = str(text).strip()
    if o.optional and text in _NONE:
        return None
    try:
        if o.kind == "list":
            items = [x.strip() for x in text.split(",") if x.strip()]
            if not items:
                raise ValueError("an empty list")
            return tuple(_item(o, x) for x in items)
        return _scalar(o.kind, text, o.choices)
    except ValueError as exc:
        raise InputError(f"{o.flag}: cannot read {text!r} ({exc}); {_expected(o)}") from None


def _item(o: Option, text: str):
    if len(o.item) == 1:
        return _scalar(o.item[0].__name__, text)
    parts = text.split(":")
    if len(parts) != len(o.item):
        raise ValueError(f"{text!r} has {len(parts)} parts, not {len(o.item)}")
    return tuple(_scalar(t.__name__, p) for t, p in zip(o.item, parts))


def _scalar(kind: str, text: str, choices=()):
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("not a yes/no value")
        return text.lower() in ("true", "1", "yes")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            float(text)                                   # a number, but not a whole one: say so
            raise ValueError("not a whole number; integers are never rounded") from None
    if kind == "float":
        return float(text)
    if kind == "choice" and text not in {str(c) for c in choices}:
        raise ValueError(f"not one of {list(choices)}")
    return text


def _expected(o: Option) -> str:
    if o.kind == "list":
        what = ":".join(t.__name__ for t in o.item)
        return f"expected comma-separated {what} values, e.g. {format_value(o, o.default) or '1,2'}"
    if o.kind == "choice":
        return f"expected one of {list(o.choices)}"
    return f"expected {'a' if o.kind != 'int' else 'an'} {o.kind}" + (" or none" if o.optional else "")


def format_value(o: Option, value) -> str:
    """``value`` as :func:`parse` reads it back."""
    if value is None:
        return "none" if o.optional else ""
    if o.kind == "list":
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def check(o: Option, value):
    """``value`` checked against ``o`` (type, choice, range) and normalised (lists to tuples, ints to floats)."""
    if value is None and o.optional:
        return value
    if o.kind != "list":
        value = _typed(o, value, {"bool": bool, "int": int, "float": float, "str": str}.get(o.kind))
        if o.kind == "choice" and value not in o.choices:
            _fail(o, f"must be one of {list(o.choices)}, not {value!r}", "pick one of them")
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
        _fail(o, f"must be a non-empty list, got {value!r}", f"give at least one value ({_expected(o)})")
    if len(o.item) == 1:
        value = tuple(_typed(o, v, o.item[0]) for v in value)
        bad = [v for v in value if o.choices and v not in o.choices]
        if bad:
            raise InputError(f"unknown {o.name.replace('_', ' ')} {bad} (flag {o.flag}): choose from {list(o.choices)}")
        return value
    bad = [v for v in value if not isinstance(v, (tuple, list)) or len(v) != len(o.item)]
    if bad:
        _fail(o, f"every item must have {len(o.item)} parts, got {bad[0]!r}", _expected(o))
    return tuple(tuple(_typed(o, p, t, ranged=False) for p, t in zip(v, o.item)) for v in value)


def _fail(o: Option, what: str, fix: str):
    raise InputError(f"{o.name} {what} (flag {o.flag}): {fix}")


def _typed(o: Option, v, want, ranged: bool = True):
    if want is None:                                   # a choice: any of its values
        return v
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if want is float and number:
        v = float(v)
    elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
        _fail(o, f"must be {'an' if want is int else 'a'} {want.__name__}, got {v!r}",
              "write a whole number (never rounded)" if want is int else f"give a {want.__name__}")
    if want in (int, float) and ranged:
        if not math.isfinite(v):
            _fail(o, f"must be a finite number, got {v!r}", "give a finite number")
        if o.min is not None and v < o.min:
            _fail(o, f"must be >= {o.min}, got {v!r}", f"use {o.min} or more")
        if o.max is not None and v > o.max:
            _fail(o, f"must be <= {o.max}, got {v!r}", f"use at most {o.max}")
    return v


def build(cls, values: dict, base=None):
    """A ``cls`` config from ``{option name: value or text}`` over ``base`` (default: the defaults)."""
    opts = {o.name: o for o in options(cls)}
    unknown = sorted(set(values) - set(opts))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for {cls.__name__}: use {sorted(opts)}")
    config = base if base is not None else cls()
    nested: dict[tuple, dict] = {}
    for name, value in values.items():
        o = opts[name]
        value = parse(o, value) if isinstance(value, str) and o.kind != "str" else value
        nested.setdefault(o.path[:-1], {})[o.path[-1]] = value
    for path, changes in sorted(nested.items(), key=lambda kv: -len(kv[0])):
        if path:
            inner = _get(config, path)
            try:                                         # the inner type's own checks (e.g. the ACT edit's)
                replaced = dataclasses.replace(inner, **changes)
            except InputError as exc:
                flags = ", ".join(opts[k].flag for k in changes)
                raise InputError(f"{exc} (flag {flags})") from None
            config = _replace(config, path, replaced)
        else:
            config = dataclasses.replace(config, **changes)
    return config


def _get(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


def _replace(obj, path, value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], value)})


def jsonable(obj):
    """``obj`` as plain JSON types (tuples become lists), for stamps and files."""
    return json.loads(json.dumps(obj, default=_plain))


def _plain(x):
    import numpy as np

    return x.tolist() if isinstance(x, (np.ndarray, np.generic)) else str(x)


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per option of ``cls``; the default is the config's (shown in ``--help``)."""
    for o in options(cls):
        shown = format_value(o, o.default)
        if o.kind == "bool":
            text = f"{o.help} (default: {o.default})"
            parser.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text.replace("%", "%%"))    # argparse %-formats help texts
        else:
            text = f"{o.help} (default: {shown or 'none'})"
            parser.add_argument(o.flag, dest=o.name, default=None, metavar=_metavar(o), help=text.replace("%", "%%"))


def _metavar(o: Option) -> str:
    if o.kind == "choice" or (o.kind == "list" and o.choices):
        return "{" + ",".join(map(str, o.choices)) + "}" + (",..." if o.kind == "list" else "")
    if o.kind == "list":
        return ":".join(t.__name__.upper() for t in o.item) + ",..."
    return o.kind.upper()


def from_args(cls, args: argparse.Namespace):
    """The config the flags in ``args`` describe (flags not given keep the defaults)."""
    given = {o.name: getattr(args, o.name) for o in options(cls) if getattr(args, o.name, None) is not None}
    return build(cls, given)
