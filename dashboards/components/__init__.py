"""Small self-contained HTML/JS views shipped with the package (no CDN, no network, no build step).

:func:`token_view_html` is the bertviz/CircuitsVis-style token view: the text of a window, every
token hoverable; hovering (or clicking, to keep it) a token colours what it attends to or what
attends to it, for up to four heads side by side or the difference of two. The page is one HTML
string (script and style inlined from ``token_view.js`` / ``token_view.css`` beside this file):
the dashboard shows it in a sandboxed frame, a notebook with ``IPython.display.HTML``.

Weights travel as 16-bit fixed point (``round(w * 65535)``, base64): an error below 8e-6, far
under the three decimals the view prints, at an eighth of the size of JSON numbers.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _asset(name: str) -> str:
    return (HERE / name).read_text()


def quantise(weights: np.ndarray) -> list[str]:
    """Per head, ``[W, W]`` weights in [0, 1] as base64 of little-endian uint16."""
    q = np.clip(np.rint(np.asarray(weights, dtype=np.float64) * 65535), 0, 65535).astype("<u2")
    return [base64.b64encode(q[h].tobytes()).decode() for h in range(q.shape[0])]


def token_view_html(window, mode: str = "side", focus: int | None = None) -> str:
    """The token view of an :class:`analyses.explorer.TokenWindow` as one self-contained HTML page.

    ``mode``: ``"side"`` (a column per head) or ``"diff"`` (first head minus second); ``focus``: a
    token index (within the window) chosen at start.
    """
    if mode == "diff" and len(window.heads) != 2:
        mode = "side"
    data = {"tokens": list(window.tokens), "start": int(window.start), "heads": [str(h) for h in window.heads],
            "weights": quantise(window.weights), "outside": np.round(window.outside, 4).tolist(), "mode": mode,
            "focus": None if focus is None else int(focus)}
    payload = json.dumps(data).replace("</", "<\\/")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(' vs '.join(data['heads']))}"
            f"</title><style>{_asset('token_view.css')}</style></head><body><div id='hw-root'></div>"
            f"<script>window.HEADWISE_TOKENS = {payload};</script><script>{_asset('token_view.js')}</script>"
            "</body></html>")
