"""The registry of analyses: the only place the CLI, the dashboard and the atlas learn about them.

Every subpackage of :mod:`analyses` that exports ``ANALYSIS`` (an :class:`~analyses.contract.Analysis`)
is registered when the registry is first read; :func:`register` adds one more (tests, plugins) and
:func:`registered` does so for the length of a ``with`` block. Saved results are found by the
``format`` of their ``summary.json`` (:func:`find_results`) and opened with the result type of the
analysis that owns that format (:func:`load_result`): no guessing from file contents.

>>> names()
['retrieval', 'sinks', 'circuits', 'similarity', 'grounding', 'atlas']
>>> get("retrieval").result.FORMAT
'headwise.retrieval'
"""
from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from probe.atomic import read_json
from probe.errors import CorruptFileError, InputError

from .contract import Analysis, Result

SKIP_DIRS = {"units", "figures"}       # what a results folder holds besides its summary


class _Registry:
    """Name -> analysis, filled from the package on first use."""

    def __init__(self):
        self.entries: dict[str, Analysis] = {}
        self.discovered = False

    def all(self) -> dict[str, Analysis]:
        if not self.discovered:
            self.discovered = True
            import analyses

            for mod in pkgutil.iter_modules(analyses.__path__):
                if mod.ispkg:
                    entry = getattr(importlib.import_module(f"analyses.{mod.name}"), "ANALYSIS", None)
                    if isinstance(entry, Analysis):
                        self.entries.setdefault(entry.name, entry)
        return self.entries


_REGISTRY = _Registry()


def analyses() -> list[Analysis]:
    """Every registered analysis, in page order."""
    return sorted(_REGISTRY.all().values(), key=lambda a: (a.order, a.name))


def names() -> list[str]:
    return [a.name for a in analyses()]


def get(name: str) -> Analysis:
    entries = _REGISTRY.all()
    if name not in entries:
        raise InputError(f"unknown analysis {name!r}: use one of {names()}")
    return entries[name]


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` (a plugin, a test's throwaway analysis); its name and format must be new."""
    entries = _REGISTRY.all()
    if analysis.name in entries:
        raise InputError(f"an analysis named {analysis.name!r} is already registered")
    if any(a.result.FORMAT == analysis.result.FORMAT for a in entries.values()):
        raise InputError(f"result format {analysis.result.FORMAT!r} already belongs to another analysis")
    entries[analysis.name] = analysis
    return analysis


def unregister(name: str) -> None:
    _REGISTRY.all().pop(name, None)


@contextmanager
def registered(analysis: Analysis) -> Iterator[Analysis]:
    """``with registered(a):`` ``a`` is registered inside the block only."""
    register(analysis)
    try:
        yield analysis
    finally:
        unregister(analysis.name)


def by_format(fmt: str) -> Analysis | None:
    return next((a for a in _REGISTRY.all().values() if a.result.FORMAT == fmt), None)


# ----------------------------------------------------------------------------- saved results

@dataclass(frozen=True)
class Saved:
    """A saved result folder, the analysis that wrote it and when."""

    analysis: Analysis
    path: Path
    mtime: float

    def load(self) -> Result:
        return self.analysis.result.load(self.path)


def find_results(*roots: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[Saved]:
    """Result folders under ``roots`` (any depth), newest first within each root.

    A ``summary.json`` that cannot be read or names no known format is left out; ``skipped``
    (a list) is told each such folder and why, so a caller can say which were skipped.
    """
    out: list[Saved] = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        found = []
        for p in root.rglob("summary.json"):
            if _visible(p, root):
                try:
                    found.append(_saved(p, strict=True))
                except (CorruptFileError, OSError) as exc:
                    if skipped is not None:
                        skipped.append((p.parent, str(exc)))
        found.sort(key=lambda s: s.mtime, reverse=True)
        out += [s for s in found if s.path not in {o.path for o in out}]
    return out


def _visible(path: Path, root: Path) -> bool:
    return not any(p.startswith(".") or p in SKIP_DIRS for p in path.relative_to(root).parts[:-1])


def _saved(path: Path, strict: bool = False) -> Saved | None:
    """The saved result of a ``summary.json``; None (``strict``: a :class:`CorruptFileError`) when it is not one."""
    try:
        d = read_json(path, "result summary")
        fmt = d.get("format") if isinstance(d, dict) else None
        analysis = by_format(fmt) if isinstance(fmt, str) else None
        if analysis is None:
            raise CorruptFileError(f"{path} names no known result format ({fmt!r})")
        return Saved(analysis, path.parent, path.stat().st_mtime)
    except (CorruptFileError, OSError):
        if strict:
            raise
        return None


def load_result(folder: str | Path) -> Result:
    """Open a saved result folder with the result type its format names."""
    saved = _saved(Path(folder) / "summary.json")
    if saved is None:
        raise CorruptFileError(f"{folder} holds no headwise result (no summary.json with a known format): "
                               f"known formats {[a.result.FORMAT for a in analyses()]}")
    return saved.load()
