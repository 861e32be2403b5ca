"""One runner for every analysis: plan, compute the missing units, reduce, save, stage by stage.

``run(analysis, model, config, store=DIR)``: for each stage, the units whose stamped file is in the
store are read back, the others are computed by the executor and written as each one finishes;
then the stage reduces. A rerun of the same command resumes; a unit made with other weights or
settings is recomputed (one line says which and why). The result is saved in the store's folder
with its figures (HTML, plotly.js beside them: offline).

Executors map :func:`compute` over units: :class:`SerialExecutor` in this process (the default);
a distributed executor only has to call :func:`compute` where its model lives and yield the payloads
back here, in any order (:class:`analyses.distributed.RayExecutor`).

>>> import tempfile
>>> from probe import load_model
>>> from analyses.retrieval import RETRIEVAL, RetrievalConfig
>>> cfg = RetrievalConfig(cells=(("code", 200, 50.0),), k=2, seeds=(0,), max_new_tokens=2)
>>> folder = tempfile.mkdtemp()
>>> res = run(RETRIEVAL, load_model("tiny-llama"), cfg, store=folder, progress=False)
>>> res.scores.shape, sorted(p.name for p in (Path(folder) / "units").iterdir())
((2, 4), ['masking', 'samples'])
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from probe.atomic import write_figure
from probe.errors import InputError

from .contract import Analysis, Result, Stage, Unit
from .layout import figures
from .units import UnitStore, normalise


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told: ``done`` of ``total`` units of ``stage`` are finished."""

    analysis: str
    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class ComputeTask:
    """Everything a unit's computation needs besides the model (ships to workers as it is)."""

    analysis: Analysis
    stage: str
    config: Any
    previous: Any


def compute(model, task: ComputeTask, unit: Unit) -> dict:
    """Compute one unit: the only way the runner (or any executor) calls a stage's ``compute``."""
    stage = task.analysis.stage(task.stage)
    return normalise(stage.compute(model, task.config, unit, task.previous))


class SerialExecutor:
    """Computes the units one after another in this process."""

    def map(self, model, task: ComputeTask, units: list[Unit]) -> Iterator[tuple[Unit, dict]]:
        for unit in units:
            yield unit, compute(model, task, unit)


def stamp(analysis: Analysis, stage: Stage, model, config, unit: Unit) -> dict:
    """What determines a unit: the model's weights, the stage's settings and the unit's spec."""
    from .config import jsonable

    settings = {name: jsonable(getattr(config, name)) for name in stage.depends}
    return {"analysis": analysis.name, "stage": stage.name, "model": model.weights_hash,
            "settings": settings, "spec": jsonable(unit.spec)}


def run(analysis: Analysis | str, model, config=None, *, store: UnitStore | str | Path | None = None,
        progress: bool | Callable[[Progress], None] = True, executor=None, png: bool = False) -> Result:
    """Run ``analysis`` on ``model`` (see the module docstring); returns its result.

    ``config``: the analysis' config (default: its defaults, the full run). ``store``: a folder (or
    :class:`UnitStore`) for the units, the result and its figures; ``None`` keeps everything in memory.
    ``progress``: a tqdm line per stage (``True``), nothing, or a callback of :class:`Progress`.
    """
    from . import registry

    analysis = registry.get(analysis) if isinstance(analysis, str) else analysis
    config = analysis.config() if config is None else config
    if not isinstance(config, analysis.config):
        raise InputError(f"{analysis.name} takes a {analysis.config.__name__}, not a {type(config).__name__}")
    store = UnitStore(store) if isinstance(store, (str, Path)) else store
    executor = executor or SerialExecutor()
    state = None
    for stage in analysis.stages:
        state = run_stage(analysis, stage, model, config, state, store, executor, progress)
    if not isinstance(state, analysis.result):
        raise TypeError(f"{analysis.name}: the last stage returned {type(state).__name__}, not {analysis.result.__name__}")
    if store is not None:
        state.save(store.root)
        write_figures(state, store.root, png=png)
    return state


def run_stage(analysis: Analysis, stage: Stage, model, config, state, store: UnitStore | None = None,
              executor=None, progress: bool | Callable[[Progress], None] = False):
    """One stage of ``analysis`` from the previous stage's ``state`` (plan, compute missing units, reduce)."""
    executor = executor or SerialExecutor()
    while True:
        units = stage.plan(model, config, state)
        ids = [u.id for u in units]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"{analysis.name}/{stage.name}: the plan repeats unit ids")
        payloads = _payloads(analysis, stage, model, config, state, units, store, executor, progress)
        state = stage.reduce(model, config, payloads, state)
        if not (stage.repeat and units):
            return state


def _payloads(analysis, stage, model, config, state, units, store, executor, progress) -> dict[str, dict]:
    if not units:
        return {}
    stamps = {u.id: stamp(analysis, stage, model, config, u) for u in units}
    done: dict[str, dict] = {}
    stale: list[str] = []
    if store is not None:
        for u in units:
            status = store.status(stage.name, u.id, stamps[u.id])
            if status == "ok":
                done[u.id] = store.get(stage.name, u.id)
            elif status != "missing":
                stale.append(f"{u.id} ({status})")
    _notice(analysis, stage, store, len(done), len(units), stale)
    todo = [u for u in units if u.id not in done]
    report = _reporter(analysis, stage, len(units), len(done), progress, getattr(executor, "label", ""))
    task = ComputeTask(analysis, stage.name, config, state)
    try:
        for unit, payload in executor.map(model, task, todo):
            if store is not None:
                store.put(stage.name, unit.id, stamps[unit.id], payload)
            done[unit.id] = payload
            report(len(done))
    finally:
        report(None)
    return {u.id: done[u.id] for u in units}


def _notice(analysis, stage, store, n_done, n_units, stale) -> None:
    if store is None:
        return
    if stale:
        print(f"headwise: {analysis.name}/{stage.name}: recomputing {len(stale)} unit(s) made with other "
              f"weights or settings: {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}", file=sys.stderr)
    if n_done:
        print(f"headwise: {analysis.name}/{stage.name}: resumed {n_done} of {n_units} unit(s) from {store.root}",
              file=sys.stderr)


def _reporter(analysis, stage, total, done, progress, where: str = ""):
    """A function of the units done so far (None: the stage is over); ``where``: e.g. " on 2 Ray workers"."""
    if callable(progress):
        progress(Progress(analysis.name, stage.name, done, total))
        return lambda n: progress(Progress(analysis.name, stage.name, n, total)) if n is not None else None
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc=f"{analysis.name}: {stage.name}{where}", unit="unit")
    return lambda n: bar.update(n - bar.n) if n is not None else bar.close()


def write_figures(result: Result, folder: str | Path, png: bool = False) -> list[str]:
    """Every figure of the result's page (default options) as ``folder/figures/<name>.html``.

    Each is written atomically (:func:`probe.atomic.write_figure`); plotly.js is written once beside
    them (works offline); ``png`` also writes PNGs where kaleido and a Chromium are available (slow:
    it starts a browser).
    """
    out = Path(folder) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for fig in figures(result.sections()):
        figure = result.plot(fig.kind, **fig.defaults())
        write_figure(figure, out / f"{fig.file_name()}.html")     # atomic; plotly.min.js once, beside them
        names.append(f"{fig.file_name()}.html")
        if png:
            names += _png(figure, out / f"{fig.file_name()}.png")
    return names


def _png(fig, path: Path) -> list[str]:
    try:
        write_figure(fig, path)
        return [path.name]
    except Exception:  # kaleido needs a browser it may not find offline: the HTML is the figure of record
        return []
