"""Shared dashboard plumbing: the cached model, cached results, downloads and notebook snippets.

Thin by design: everything computed here is a call into ``probe`` or ``analyses``; this module
only caches (``st.cache_resource`` for the model, once per server; ``st.cache_data`` for results)
and exports.
"""
from __future__ import annotations

import os
import shutil

import streamlit as st

from analyses.atlas import head_grid
from analyses.patterns import pattern_window, pooled_pattern
from probe import DEFAULT_MODEL, capture, load_model

MODEL_ENV = "HEADWISE_DASHBOARD_MODEL"
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
CAPTURE_MAX_TOKENS = 256  # full T x T capture (and its heat map) only up to this length


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def model_name() -> str:
    return st.session_state.get("model_name") or default_model()


@st.cache_resource(show_spinner="Loading model (once per server)…")
def get_model(name: str):
    return load_model(name)


@st.cache_data(show_spinner="Streaming per-head statistics…", max_entries=32)
def cached_grid(name: str, text: str):
    return head_grid(get_model(name), text)


@st.cache_data(show_spinner="Capturing the pattern…", max_entries=64)
def cached_capture(name: str, text: str, layer: int, head: int):
    return capture(get_model(name), text, layers=[layer], heads=[head])


@st.cache_data(show_spinner="Pooling the whole pattern chunk by chunk…", max_entries=16)
def cached_pooled(name: str, text: str, layer: int, mode: str, cells: int):
    return pooled_pattern(get_model(name), text, layer=layer, cells=cells, mode=mode)


@st.cache_data(show_spinner="Reading the token window…", max_entries=64)
def cached_window(name: str, text: str, layer: int, queries: tuple[int, int], keys: tuple[int, int]):
    return pattern_window(get_model(name), text, layer=layer, queries=queries, keys=keys)


def kaleido_ok() -> bool:
    """PNG/SVG export needs kaleido (>=1) and a Chromium; the Debian one is found via BROWSER_PATH."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    if not os.environ.get("BROWSER_PATH") and shutil.which("chromium"):
        os.environ["BROWSER_PATH"] = shutil.which("chromium")
    return bool(os.environ.get("BROWSER_PATH"))


def figure_image(fig, fmt: str) -> bytes:
    """PNG/SVG bytes through kaleido with the local plotly.js and no MathJax (its default is a CDN URL)."""
    import kaleido

    kaleido_ok()
    layout = fig.layout
    opts = {"format": fmt, "width": layout.width or 1100, "height": layout.height or 600, "scale": 1}
    return kaleido.calc_fig_sync(fig.to_plotly_json(), opts=opts, kopts={"mathjax": False})


def figure_downloads(fig, name: str) -> None:
    """HTML (plotly.js inlined: works offline) and, when kaleido works, PNG and SVG; built lazily on click."""
    cols = st.columns(3)
    cols[0].download_button("Figure as HTML", lambda: fig.to_html(include_plotlyjs=True, full_html=True),
                            file_name=f"{name}.html", mime="text/html", on_click="ignore", key=f"html-{name}")
    if kaleido_ok():
        cols[1].download_button("PNG", lambda: figure_image(fig, "png"), file_name=f"{name}.png",
                                mime="image/png", on_click="ignore", key=f"png-{name}")
        cols[2].download_button("SVG", lambda: figure_image(fig, "svg"), file_name=f"{name}.svg",
                                mime="image/svg+xml", on_click="ignore", key=f"svg-{name}")


def table_download(df, name: str) -> None:
    st.download_button("Table as CSV", lambda: df.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv",
                       on_click="ignore", key=f"csv-{name}")


def reproduce(code: str) -> None:
    with st.expander("Reproduce in a notebook"):
        st.code(code.strip(), language="python")
