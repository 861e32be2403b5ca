"""Mirror the analyses' tqdm bars into a Streamlit progress bar while a page runs an analysis.

The analyses report progress with tqdm (they never import Streamlit). Inside :func:`st_progress`
every tqdm bar drawn by *this* thread (the page's script thread) also moves one ``st.progress``
element: ``tqdm.std.tqdm.display`` is wrapped once, and routes to the bar registered for the
calling thread, so other sessions and plain terminal runs are untouched.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import tqdm.std as _tqdm

_targets: dict[int, object] = {}
_original_display = _tqdm.tqdm.display


def _display(self, msg=None, pos=None):
    bar = _targets.get(threading.get_ident())
    if bar is not None and getattr(self, "total", None):
        frac = min(1.0, max(0.0, self.n / self.total))
        bar.progress(frac, text=f"{self.desc or 'running'}: {self.n}/{self.total}")
    return _original_display(self, msg, pos)


_tqdm.tqdm.display = _display


@contextmanager
def st_progress(label: str):
    """``with st_progress("Running"): analysis(...)``: a progress bar fed by the analysis' tqdm bars."""
    import streamlit as st

    bar = st.progress(0.0, text=label)
    key = threading.get_ident()
    _targets[key] = bar
    try:
        yield bar
    finally:
        _targets.pop(key, None)
        bar.empty()
