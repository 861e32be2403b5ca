"""The analysis contract: what every analysis declares, so that the CLI, the dashboard and the atlas
need nothing else.

An analysis is an :class:`Analysis` entry: its name and title, the paper and the docs/methods.md section
it implements, a config class (:mod:`analyses.config`: defaults = the full published-style run,
``small(model)`` = a first run of minutes), the minimum sample size below which a result is only an
illustration, the result type, and the work as :class:`Stage` s. A stage

* **plans** units from the previous stage's state: small JSON-able specs with a stable id;
* **computes** each unit purely from ``(model, config, unit, previous)``, so a unit can run in
  another process that loaded the same model, and returns a payload (a dict of JSON values and
  arrays);
* **reduces** the payloads (in plan order) to the state the next stage reads; the last stage's
  state is the :class:`Result`.

:func:`analyses.runner.run` drives any analysis: units already in the store are skipped, new ones
are written atomically as they finish, and a rerun resumes. Every result derives from
:class:`Result`: a format id and version, a tidy ``to_frame()`` (``layer, head, metric, value``),
``plot(kind)``, ``save``/``load``, per-head scores and roles for the atlas, headline numbers, and
the page layout the dashboard draws (:mod:`analyses.layout`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd

from probe.atomic import read_json, write_json
from probe.errors import CorruptFileError, InputError
from probe.heads import HeadId
from probe.shapes import HeadScores

from .config import Config

UNIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,150}$")
FRAME_COLUMNS = ("layer", "head", "metric", "value")


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``id`` names it in the store (stable across runs), ``spec`` says what it is."""

    id: str
    spec: dict

    def __post_init__(self):
        if not UNIT_ID.match(self.id):
            raise InputError(f"unit id {self.id!r} must be a short file-name-safe word ([A-Za-z0-9._=+-])")


Plan = Callable[[Any, Config, Any], list[Unit]]
Compute = Callable[[Any, Config, Unit, Any], dict]
Reduce = Callable[[Any, Config, dict, Any], Any]
Check = Callable[[Any, Config, dict], "str | None"]


@dataclass(frozen=True)
class Stage:
    """A step of an analysis (see the module docstring).

    ``depends``: the config fields that determine this stage's units; they go into every unit's
    stamp, so changing one recomputes the stage while the others are reused. ``repeat``: plan
    again after each reduce until the plan is empty (a sequential search, one unit a step).
    ``check(model, config, payload)``: what is wrong with a saved payload (values out of range,
    shapes against the model), or None; a unit it faults is recomputed with a warning, never used.
    """

    name: str
    plan: Plan
    compute: Compute | None
    reduce: Reduce
    depends: tuple[str, ...] = ()
    repeat: bool = False
    check: Check | None = None


def no_units(model, config, previous) -> list[Unit]:
    """The plan of a stage that only reduces (e.g. the last one, assembling the result)."""
    return []


@dataclass(frozen=True)
class Stat:
    """A headline number with its sample size and confidence interval where the analysis has them."""

    label: str
    value: Any
    n: int | None = None
    ci: tuple[float, float] | None = None
    fmt: str = ".3f"

    def text(self) -> str:
        if isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            v = format(self.value, self.fmt)
            return v + (f" [{format(self.ci[0], self.fmt)}, {format(self.ci[1], self.fmt)}]" if self.ci else "")
        return "-" if self.value is None else str(self.value)

    def help(self) -> str:
        parts = ([f"95% interval [{self.ci[0]:.3g}, {self.ci[1]:.3g}]"] if self.ci else []) + \
            ([f"n = {self.n}"] if self.n is not None else [])
        return "; ".join(parts)


class Result:
    """Base of every analysis result (a frozen dataclass with a ``model_id`` field).

    ``FORMAT``/``VERSION`` tag its ``summary.json`` (how saved results are found and opened);
    subclasses implement the methods that raise ``NotImplementedError``.
    """

    FORMAT: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    READS: ClassVar[tuple[int, ...]] = (1,)        # versions load() accepts

    def to_frame(self) -> pd.DataFrame:
        """Tidy: ``layer, head, metric, value`` (+ documented columns); layer-level rows have
        ``head = -1``, run-level rows ``layer = head = -1``."""
        raise NotImplementedError

    def plots(self) -> dict[str, Callable]:
        """Figure kinds -> functions of the kind's options returning a plotly figure (first = default)."""
        raise NotImplementedError

    def plot(self, kind: str | None = None, **options):
        """The ``kind`` figure (default: the first of :meth:`plots`)."""
        plots = self.plots()
        kind = kind or next(iter(plots))
        if kind not in plots:
            raise InputError(f"unknown plot kind {kind!r}: use one of {sorted(plots)}")
        return plots[kind](**options)

    def save(self, folder: str | Path) -> Path:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: str | Path) -> "Result":
        raise NotImplementedError

    def head_scores(self) -> dict[str, HeadScores]:
        """Named per-head score matrices ``[layer, head]`` (the atlas and cross-analysis studies read these)."""
        return {}

    def item_scores(self) -> dict[str, np.ndarray]:
        """Per-item versions ``[item, layer, head]`` of some :meth:`head_scores` (same names).

        The mean over items is that head score (or ranks heads as it does), so a cross-analysis
        study can bootstrap over the items (prompts, samples) behind it. Default: none.
        """
        return {}

    def roles(self) -> dict[HeadId, list[str]]:
        """Head -> short role labels, by this analysis' own rule."""
        return {}

    def summary(self) -> dict[str, Stat]:
        """Headline numbers (with n and a confidence interval where the analysis has them)."""
        return {}

    def n_samples(self) -> int:
        """The sample size behind the headline numbers (compared with ``Analysis.min_samples``)."""
        raise NotImplementedError

    def sections(self) -> list:
        """What the dashboard page shows, top to bottom (:mod:`analyses.layout`); default: every figure."""
        from .layout import Figure, Section

        return [Section("", tuple(Figure(k) for k in self.plots()))]

    # ------------------------------------------------------------------ summary.json helpers
    def write_summary(self, folder: str | Path, body: dict) -> Path:
        """``folder/summary.json`` with this result's format, version and model id (atomic); returns ``folder``."""
        write_json(Path(folder) / "summary.json",
                   {"format": self.FORMAT, "version": self.VERSION, "model_id": self.model_id, **body})
        return Path(folder)

    @classmethod
    def read_summary(cls, folder: str | Path) -> dict:
        """``folder/summary.json``, checked to be this result's format in a version it reads."""
        path = Path(folder) / "summary.json"
        d = read_json(path, f"{cls.__name__} summary")
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise CorruptFileError(f"{path} is not a {cls.FORMAT} result (format {d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("version") not in cls.READS:
            raise CorruptFileError(f"{path}: {cls.FORMAT} version {d.get('version')!r} is not one of {list(cls.READS)}: "
                                   "rerun the analysis with this version of headwise")
        return d


@dataclass(frozen=True)
class Command:
    """A top-level command an analysis adds to the CLI (``headwise <name> ...``), e.g. ``headwise head L3H1``.

    ``arguments(parser)`` declares its flags; ``run(args, load)`` does the work and returns the exit
    status (``load(args)`` is the CLI's one model loader, for the shared ``--model`` group).
    """

    name: str
    help: str
    arguments: Callable[[Any], None]
    run: Callable[[Any, Callable], int]
    loads_model: bool = True             # add the shared --model --device --dtype --threads group


@dataclass(frozen=True)
class Analysis:
    """A registry entry (see the module docstring)."""

    name: str
    title: str
    description: str
    paper: str
    url: str
    methods: str
    config: type[Config]
    result: type[Result]
    stages: tuple[Stage, ...]
    min_samples: int = 1
    order: int = 100
    icon: str = ""                   # a dashboard page icon (e.g. ":material/search:")
    commands: tuple[Command, ...] = ()   # extra top-level CLI commands (see Command)

    def __post_init__(self):
        if not re.match(r"^[a-z][a-z0-9_]*$", self.name):
            raise InputError(f"analysis name {self.name!r} must be a lower-case identifier")
        if not issubclass(self.result, Result) or not self.result.FORMAT:
            raise InputError(f"{self.name}: the result type must derive from analyses.contract.Result with a FORMAT")
        if not issubclass(self.config, Config):
            raise InputError(f"{self.name}: the config type must derive from analyses.config.Config")
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise InputError(f"{self.name}: stages need distinct names, got {names}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise InputError(f"{self.name} has no stage {name!r}: {[s.name for s in self.stages]}")

    def citation(self) -> str:
        return f"{self.paper} ({self.url}); {self.methods}"


def head_frame(scores: dict[str, HeadScores], **columns) -> pd.DataFrame:
    """Tidy ``layer, head, metric, value`` rows of named ``[layer, head]`` matrices (+ constant columns)."""
    parts = []
    for metric, m in scores.items():
        L, H = m.shape
        parts.append(pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)],
                                   "head": [h for _ in range(L) for h in range(H)],
                                   "metric": metric, "value": [float(v) for v in m.ravel()]}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(FRAME_COLUMNS))
    for k, v in columns.items():
        frame[k] = v
    return frame


def run_rows(values: dict[str, float]) -> pd.DataFrame:
    """Run-level rows (``layer = head = -1``) of the tidy frame."""
    return pd.DataFrame([{"layer": -1, "head": -1, "metric": k, "value": float(v)} for k, v in values.items()],
                        columns=list(FRAME_COLUMNS))
