"""What is active on a model, per calling context: the state :func:`probe.intervene` and friends change.

A model carries only immutable configuration (its :class:`probe.runtime.Runtime`: the recorded
native attention, the head layout, the engine's refusal). What a caller turns on (intervention
specs, statistics collectors, taps, a memory budget) lives in a ``ContextVar`` that maps each
runtime to an immutable :class:`Active` snapshot. So it affects only the calling thread or asyncio
task: a second thread running the same model meanwhile sees none of it and computes exactly what
the plain model computes. ``probe.families`` keeps its recording hooks in a ``ContextVar`` for the
same reason.

Context rules (Python's): a new ``threading.Thread`` starts with nothing active (Python 3.11-3.13);
an asyncio task sees what was active when it was created, and what it turns on stays inside it;
``contextvars.copy_context().run(fn)`` carries the caller's state into another thread on purpose.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

DEFAULT_BUDGET = 96 * 2**20  # bytes of scores per attention call (chunked over rows)

_STATE: ContextVar[Mapping[object, "Active"]] = ContextVar("headwise_active", default={})


@dataclass(frozen=True, eq=False)
class Active:
    """One model's active items in one context; a change makes a new snapshot (never edited in place).

    ``work`` holds what one snapshot computes lazily (compiled layer plans) and per-thread buffers
    (reused scratch, the pattern-echo stores of the forward in flight), so contexts never share them.
    """

    specs: tuple = ()
    collectors: tuple = ()
    taps: tuple = ()
    budget: int = DEFAULT_BUDGET
    work: "Work" = field(default_factory=lambda: Work(), repr=False)

    @property
    def idle(self) -> bool:
        return not (self.specs or self.collectors or self.taps)

    def plus(self, kind: str, item) -> "Active":
        return replace(self, **{kind: getattr(self, kind) + (item,)}, work=Work())

    def minus(self, kind: str, item) -> "Active":
        return replace(self, **{kind: tuple(x for x in getattr(self, kind) if x is not item)}, work=Work())

    def holds(self, kind: str, item) -> bool:
        return any(x is item for x in getattr(self, kind))


class Work:
    """Lazily computed plans (shared: a pure function of the snapshot) and per-thread buffers."""

    def __init__(self):
        self.plans: dict = {}
        self._local = threading.local()

    def local(self, name: str, make):
        value = getattr(self._local, name, None)
        if value is None:
            value = make()
            setattr(self._local, name, value)
        return value


def current(rt) -> Active | None:
    """What is active on runtime ``rt`` in the calling context (None: nothing ever was)."""
    return _STATE.get().get(rt)


def _set(rt, active: Active) -> None:
    state = dict(_STATE.get())
    if active.idle and active.budget == DEFAULT_BUDGET:
        state.pop(rt, None)
    else:
        state[rt] = active
    _STATE.set(state)


def add(rt, kind: str, item) -> None:
    _set(rt, (current(rt) or Active()).plus(kind, item))


def remove(rt, kind: str, item) -> bool:
    """Take ``item`` off this context's state; False when it is not active here (another context's)."""
    now = current(rt)
    if now is None or not now.holds(kind, item):
        return False
    _set(rt, now.minus(kind, item))
    return True


@contextmanager
def attached(rt, kind: str, item) -> Iterator:
    """``item`` active (on ``kind``: specs, collectors or taps) for the block, in this context only."""
    add(rt, kind, item)
    try:
        yield item
    finally:
        remove(rt, kind, item)


@contextmanager
def detached(rt, kind: str, item) -> Iterator[None]:
    """``item`` paused for the block (put back after it, if it was active)."""
    was = remove(rt, kind, item)
    try:
        yield
    finally:
        if was:
            add(rt, kind, item)


@contextmanager
def budget(rt, n_bytes: int) -> Iterator[None]:
    now = current(rt) or Active()
    old = now.budget
    _set(rt, replace(now, budget=int(n_bytes), work=Work()))
    try:
        yield
    finally:
        _set(rt, replace(current(rt) or Active(), budget=old, work=Work()))
