"""A server-wide memo for long computations that report progress while they run.

``st.cache_data`` / ``st.cache_resource`` cannot wrap a function that updates a progress bar drawn
outside it (Streamlit replays a cached function's elements), so the explorer's runs are memoised
here instead: one small least-recently-used table per kind, shared by every session of the server
(the values are immutable results: :class:`analyses.explorer.Explorer`, its row bands, pooled
overviews). A value is computed outside the lock, so a slow run never blocks another session.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import streamlit as st


class Memo:
    """An LRU table of at most ``size`` values."""

    def __init__(self, size: int):
        self.size, self.lock, self.items = size, threading.Lock(), OrderedDict()

    def get(self, key, compute: Callable[[], object]):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value

    def peek(self, key):
        """The value if it is already computed, else None (never computes)."""
        with self.lock:
            return self.items.get(key)


@st.cache_resource
def table(kind: str, size: int) -> Memo:
    """The server's memo for ``kind`` (one per kind, made on first use)."""
    return Memo(size)
