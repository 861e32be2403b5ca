"""Progress with an ETA and a cancel button for every long run of a page.

``with LiveProgress("Running retrieval", key) as bar: work(progress=bar.update)``: a bar with
"done/total · elapsed · ~left" and a *Cancel* button. Cancelling works the way Streamlit works:
the click asks for a rerun, the running script stops at its next Streamlit call (the next
``update``), and the page says so on the rerun. Work done so far is kept wherever the work keeps
it (a run's units are on disk: running again resumes).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import streamlit as st


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def eta_text(done: float, total: float, elapsed: float, counted: float | None = None) -> str:
    """``3/12 · 0:42 elapsed · ~2:06 left``; ``counted``: how much of ``done`` this run did (resumed work is free)."""
    counted = done if counted is None else counted
    text = f"{done:g}/{total:g} · {duration(elapsed)} elapsed"
    if 0 < counted and done < total:
        text += f" · ~{duration(elapsed / counted * (total - done))} left"
    return text


class LiveProgress:
    """A progress bar with elapsed time, an ETA and a Cancel button (see the module docstring)."""

    def __init__(self, label: str, key: str):
        self.label, self.key = label, key
        self.start = time.monotonic()
        self.first: dict[str, float] = {}       # per stage: units already done when it started

    def __enter__(self) -> "LiveProgress":
        cols = st.columns([6, 1])
        self.bar = cols[0].progress(0.0, text=f"{self.label}…")
        self.cancel = cols[1].empty()           # a placeholder: emptied when the run ends (a column is not)
        self.cancel.button("Cancel", key=f"{self.key}:cancel", on_click=cancelled, args=(self.key,),
                           help="stop after the current step; what is finished stays saved")
        return self

    def update(self, done: float, total: float, what: str = "") -> None:
        """Show ``done`` of ``total`` (``what``: the step); Streamlit stops the script here on Cancel."""
        first = self.first.setdefault(what, done)
        frac = min(1.0, done / total) if total else 1.0
        text = eta_text(done, total, time.monotonic() - self.start, done - first)
        self.bar.progress(frac, text=f"{self.label}{f' — {what}' if what else ''}: {text}")

    def count(self, done: int, what: str) -> None:
        """A run of unknown length: ``done`` steps so far and the elapsed time (no estimate to give)."""
        self.bar.progress(0.0, text=f"{self.label}: {done} {what} · {duration(time.monotonic() - self.start)} elapsed "
                                    "(no estimate: its length depends on what it generates)")

    def __exit__(self, *exc) -> None:
        self.bar.empty()
        self.cancel.empty()


def cancelled(key: str) -> None:
    st.session_state[f"{key}:cancelled"] = True


def was_cancelled(key: str) -> bool:
    """True once after the Cancel button of ``key`` was clicked (shows the note)."""
    if st.session_state.pop(f"{key}:cancelled", False):
        st.info("Cancelled. Finished work is kept: run it again to resume from there.")
        return True
    return False


# ----------------------------------------------------------------------------- forwards a page runs by itself

class _LayerTicks:
    """A tap that sees each layer's attention call (``on_call``: observes nothing, so no path changes)."""

    layers = None

    def __init__(self, tick):
        self.tick = tick

    def on_call(self, module, *args) -> None:
        self.tick()


def live(table, key, label: str, page: str, model, compute, calls: int):
    """``table.get(key, compute)`` (a :class:`dashboards.memo.Memo`), with progress, ETA and Cancel while it runs.

    For the forwards a page starts by itself (the explorer's overview and rows, the token view): the bar
    counts attention calls (``calls``: how many the run makes, one per layer per forward). A cancelled
    run is not restarted by the rerun the click causes: the page stops with a *Run it* button until it is
    pressed or the inputs change (another ``key``).
    """
    value = table.peek(key)
    if value is not None:
        return value
    held, mark = f"{page}:held", hash(key)
    if st.session_state.pop(f"{page}:cancelled", False):
        st.session_state[held] = mark
    if st.session_state.get(held) == mark:
        st.info(f"{label}: cancelled. Nothing is computed until you ask again (or change the inputs).")
        st.button("Run it", key=f"{page}:again", on_click=st.session_state.pop, args=(held, None))
        st.stop()
    st.session_state.pop(held, None)
    with LiveProgress(label, page) as bar, layer_ticks(model, bar, calls):
        return table.get(key, compute)


@contextmanager
def layer_ticks(model, bar: LiveProgress, calls: int | None):
    """Feed ``bar`` one step per attention call of ``model`` in this block (``calls``: how many; None: unknown,
    then the bar counts them with the elapsed time and gives no estimate)."""
    from probe.runtime import tap

    seen = [0]

    def tick():
        seen[0] += 1
        if calls:
            bar.update(min(seen[0], calls), calls, "layers")
        else:
            bar.count(seen[0], "layer calls")

    with tap(model, _LayerTicks(tick)):
        yield
