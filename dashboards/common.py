"""Shared dashboard plumbing: the cached model and results, the selected head, downloads and snippets.

Thin by design: everything computed here is a call into ``probe`` or ``analyses``; this module
only caches (``st.cache_resource`` for the model, once per server, and for opened results;
``st.cache_data`` for prompt statistics and patterns) and exports.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import streamlit as st

from analyses import registry
from analyses.atlas import head_grid
from analyses.data import data_dir
from analyses.explorer import Explorer, Rows
from dashboards import memo
from dashboards.progress import live
from probe import DEFAULT_MODEL, HeadId, HeadwiseError, capture, load_model

MODEL_ENV = "HEADWISE_DASHBOARD_MODEL"
RESULTS_ENV = "HEADWISE_RESULTS"
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
CAPTURE_MAX_TOKENS = 256  # full T x T capture (and its heat map) only up to this length


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def default_results() -> str:
    return os.environ.get(RESULTS_ENV) or str(Path.cwd() / "results")


def results_root() -> Path:
    return Path(st.session_state.get("results_root") or default_results()).expanduser()


def model_name() -> str:
    return st.session_state.get("model_name") or default_model()


def result_dir(analysis: str, model_id: str) -> Path:
    """Where a page's run writes: ``<results root>/<analysis>-<model>``."""
    return results_root() / f"{analysis}-{model_id.replace('/', '_')}"


def run_folder(analysis, model, config) -> Path:
    """The folder a page's run of ``config`` writes: :func:`result_dir`, or, when that folder holds a run
    of other settings, ``<result_dir>-<settings hash>`` (a run never replaces another's result)."""
    import hashlib
    import json

    from analyses.store import read_stamp, run_stamp
    from probe.errors import HeadwiseError

    base = result_dir(analysis.name, model.model_id)
    want = run_stamp(analysis, model, config)
    try:
        old = read_stamp(base)
    except HeadwiseError:
        old = {}
    if old is None or all(old.get(k) == v for k, v in want.items()):
        return base
    digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}-{digest}")


@st.cache_resource(show_spinner="Loading model (once per server)…")
def get_model(name: str):
    return load_model(name)


def cached_grid(name: str, text: str):
    """Per-head statistics of ``text`` (memoised per server), with progress, ETA and Cancel while they stream."""
    model = get_model(name)
    return live(memo.table("grid", 32), (name, text), "Streaming per-head statistics of the prompt", "grid", model,
                lambda: head_grid(model, text), calls=model.n_layers)


@st.cache_data(show_spinner="Capturing the pattern…", max_entries=64)
def cached_capture(name: str, text: str, layer: int, head: int):
    return capture(get_model(name), text, layers=[layer], heads=[head])


# ----------------------------------------------------------------------------- the explorer (memoised runs)

def open_explorer(name: str, text: str) -> Explorer:
    """The :class:`~analyses.explorer.Explorer` of ``text`` (tokenised once per server)."""
    return memo.table("explorer", 4).get((name, text), lambda: Explorer.open(get_model(name), text))


def explorer_rows(name: str, text: str, layer: int, queries: tuple[int, int], page: str = "rows") -> Rows:
    """Exact rows of ``layer`` holding ``queries``: one run per cached band (moves inside it are free);
    while it runs, progress with an ETA and a Cancel button (``page``: the key of that bar)."""
    ex = open_explorer(name, text)
    band = ex.band(queries)
    return live(memo.table("rows", 8), (name, text, layer, band),
                f"Layer {layer}'s rows {band[0]}..{band[1] - 1} of {ex.n_tokens} tokens (once per band; window "
                "moves inside it are then instant)", f"{page}:{layer}", ex.model, lambda: ex.rows(layer, *band),
                calls=layer + 1)


def explorer_overview(name: str, text: str, layer: int, mode: str, cells: int):
    """The pooled overview of ``layer`` (once per layer and pooling), with progress, ETA and Cancel."""
    ex = open_explorer(name, text)
    return live(memo.table("overview", 16), (name, text, layer, mode, cells),
                f"Pooling layer {layer} over {ex.n_tokens} tokens (once per layer)", "overview", ex.model,
                lambda: ex.overview(layer, cells, mode), calls=ex.model.n_layers)


# ----------------------------------------------------------------------------- saved results

def saved_results() -> list[registry.Saved]:
    """Result folders under the results root, then the runs shipped in ``data/`` (newest first each).

    Folders whose summary is damaged are left out, and a warning names them and what to do.
    """
    skipped: list = []
    found = registry.find_results(results_root(), data_dir(), skipped=skipped)
    if skipped:
        shown = "; ".join(f"{path.name}: {why.split(': ', 1)[-1]}" for path, why in skipped[:3])
        st.warning(f"Skipped {len(skipped)} damaged result folder(s) under the results folder ({shown}"
                   f"{' …' if len(skipped) > 3 else ''}). Rerun `headwise scan … --out` into them or delete them; "
                   "the other results open as usual.")
    return found


@st.cache_resource(show_spinner="Opening saved results…", max_entries=64)
def cached_result(path: str, mtime: float):
    return registry.load_result(path)


def open_result(saved: registry.Saved):
    return cached_result(str(saved.path), saved.mtime)


def opened_results(model_id: str, every: bool = False):
    """``(analysis, label, Result)`` of the saved results made for ``model_id`` (newest first; only the
    newest of each analysis unless ``every``); damaged results are skipped, the others still show."""
    seen = set()
    for saved in saved_results():
        if not every and saved.analysis.name in seen:
            continue
        try:
            res = open_result(saved)
        except (HeadwiseError, OSError, ValueError, KeyError):
            continue
        if res.model_id == model_id:
            seen.add(saved.analysis.name)
            yield saved.analysis.name, label_of(saved), res


def label_of(saved: registry.Saved) -> str:
    root = results_root()
    return str(saved.path.relative_to(root)) if saved.path.is_relative_to(root) else \
        f"shipped: {saved.path.relative_to(data_dir())}"


# ----------------------------------------------------------------------------- the selected head

def selected_head() -> HeadId:
    """The head selected in the sidebar (set by clicks on any grid: :mod:`dashboards.grids`)."""
    return st.session_state.get("head") or HeadId(0, 0)


# ----------------------------------------------------------------------------- exports

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


def show_table(df, name: str) -> None:
    st.dataframe(df, hide_index=True)
    table_download(df, name)


def source_caption(saved: registry.Saved, result, model) -> None:
    note = "" if result.model_id == model.model_id else f" — made for **{result.model_id}**, not the selected model"
    st.caption(f"{saved.path} · model {result.model_id}{note}")
