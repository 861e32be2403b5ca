"""One runner for every analysis: plan, compute the missing units, reduce, save, stage by stage.

``run(analysis, model, config, store=DIR)``: for each stage, the units whose stamped file is in the
store are read back, the others are computed by the executor and written as each one finishes;
then the stage reduces. A rerun of the same command resumes; a unit made with other weights or
settings is recomputed (one line says which and why); a damaged unit (unreadable, edited, of
another format version, or faulted by the stage's ``check``) is recomputed with a warning naming
its file. The result is saved in the store's folder with its figures (HTML, plotly.js beside
them: offline). The whole scan holds the folder's writer lock, and the folder is stamped with the
run (:mod:`analyses.store`): another run's folder is refused unless ``force=True``.

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
from .store import claim, run_stamp, writer
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
        progress: bool | Callable[[Progress], None] = True, executor=None, png: bool = False,
        force: bool = False) -> Result:
    """Run ``analysis`` on ``model`` (see the module docstring); returns its result.

    ``config``: the analysis' config (default: its defaults, the full run). ``store``: a folder (or
    :class:`UnitStore`) for the units, the result and its figures; ``None`` keeps everything in memory.
    ``progress``: a tqdm line per stage (``True``), nothing, or a callback of :class:`Progress`.
    ``force``: replace the result of another run (other analysis, model or settings) in ``store``;
    its units whose stamps still match are reused.
    """
    from . import registry

    analysis = registry.get(analysis) if isinstance(analysis, str) else analysis
    config = analysis.config() if config is None else config
    if not isinstance(config, analysis.config):
        raise InputError(f"{analysis.name} takes a {analysis.config.__name__}, not a {type(config).__name__}")
    if store is None:
        return _run(analysis, model, config, None, executor, progress)
    from .store import check_output_folder

    store = UnitStore(check_output_folder(store)) if isinstance(store, (str, Path)) else store
    with writer(store.root, f"headwise scan {analysis.name}"):
        claim(store.root, run_stamp(analysis, model, config), force=force)
        result = _run(analysis, model, config, store, executor, progress)
        result.save(store.root)
        write_figures(result, store.root, png=png)
    return result


def _run(analysis, model, config, store, executor, progress) -> Result:
    executor = executor or SerialExecutor()
    state = None
    for stage in analysis.stages:
        state = run_stage(analysis, stage, model, config, state, store, executor, progress)
    if not isinstance(state, analysis.result):
        raise TypeError(f"{analysis.name}: the last stage returned {type(state).__name__}, not {analysis.result.__name__}")
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
    done, stale = _saved(stage, model, config, units, stamps, store)
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


def _saved(stage, model, config, units, stamps, store) -> tuple[dict[str, dict], list[str]]:
    """The units already in ``store`` and usable; the others' ids with why (stale, damaged)."""
    done: dict[str, dict] = {}
    stale: list[str] = []
    if store is None:
        return done, stale
    for u in units:
        status, payload = store.lookup(stage.name, u.id, stamps[u.id])
        if status == "ok" and stage.check is not None:
            problem = _checked(stage, model, config, payload)
            if problem:
                status = f"damaged: {store.path(stage.name, u.id)}: {problem}"
        if status == "ok":
            done[u.id] = payload
        elif status.startswith("damaged"):
            print(f"headwise: warning: the unit {stage.name}/{u.id} is unreadable or damaged, recomputing it: "
                  f"{status[9:]}", file=sys.stderr)
        elif status != "missing":
            stale.append(f"{u.id} ({status})")
    return done, stale


def _checked(stage, model, config, payload) -> str | None:
    """The stage's verdict on a saved payload; a check that trips on a malformed payload faults it too."""
    try:
        return stage.check(model, config, payload)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        return f"malformed payload ({type(exc).__name__}: {exc})"


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
    from .terminal import bar as progress_bar

    bar = progress_bar(total, f"{analysis.name}: {stage.name}{where}", initial=done)   # one line when finished
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
