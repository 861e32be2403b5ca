"""Shared dashboard plumbing: the cached model, cached results, downloads and notebook snippets.

Thin by design: everything computed here is a call into ``probe`` or ``analyses``; this module
only caches (``st.cache_resource`` for the model, once per server; ``st.cache_data`` for results)
and exports.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import streamlit as st

from analyses.atlas import head_grid, result_scores
from analyses.patterns import pattern_window, pooled_pattern
from dashboards import runs
from dashboards.progress import st_progress
from probe import DEFAULT_MODEL, HeadwiseError, capture, load_model

MODEL_ENV = "HEADWISE_DASHBOARD_MODEL"
RESULTS_ENV = "HEADWISE_RESULTS"
ROOT = Path(__file__).resolve().parent.parent
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


def show_figure(fig, name: str, key: str | None = None, **chart_kwargs):
    """Draw a figure with its HTML/PNG/SVG downloads; returns the chart's selection event."""
    event = st.plotly_chart(fig, key=key or f"chart-{name}", **chart_kwargs)
    figure_downloads(fig, name)
    return event


def show_table(df, name: str) -> None:
    st.dataframe(df, hide_index=True)
    table_download(df, name)


# ----------------------------------------------------------------------------- saved results and runs

@st.cache_resource(show_spinner="Opening saved results…", max_entries=64)
def cached_result(kind: str, path: str, mtime: float):
    return runs.load(kind, path)


def open_result(kind: str, path: Path):
    return cached_result(kind, str(path), path.stat().st_mtime)


def saved_results(kind: str, fmt: str | None = None) -> list[Path]:
    paths = runs.find(results_root(), shipped=True)[kind]
    return [p for p in paths if runs._summary(p).get("format") == fmt] if fmt else paths


def run_button(kind: str, label: str) -> None:
    """An expander that runs ``kind`` with :func:`runs.defaults` on the selected model, with a progress bar."""
    model = get_model(model_name())
    with st.expander(f"Run {label} on {model.model_id} (small defaults; files go to the results folder)"):
        text = st.text_area("Options (JSON; the defaults finish in about two minutes on two CPU cores)",
                            json.dumps(runs.defaults(kind, model)), key=f"opts-{kind}", height=90)
        if st.button(f"Run {label}", key=f"run-{kind}", type="primary"):
            try:
                opts = json.loads(text)
                with st_progress(f"Running {label} on {model.model_id}…"):
                    runs.run(kind, model, results_root(), **opts)
                st.session_state[f"src-{kind}"] = str(runs.result_dir(results_root(), kind, model.model_id))
                for k in [k for k in st.session_state if str(k).startswith(f"pick-{kind}")]:
                    del st.session_state[k]                       # show the new result
            except (HeadwiseError, ValueError, TypeError) as exc:
                st.error(f"{type(exc).__name__}: {exc}")


def result_source(kind: str, label: str, fmt: str | None = None, run: bool = True, stop: bool = True):
    """The page's result: a saved folder picked from the results root, or a fresh run with small defaults.

    Returns ``(path, result)`` or stops the page with a hint when nothing is saved yet."""
    if run:
        run_button(kind, label)
    paths = saved_results(kind, fmt)
    if not paths:
        st.info(f"No saved {label} results under {results_root()}: run it above, or point the sidebar's "
                f"results folder at the output of `headwise scan {kind} --out DIR`.")
        if stop:
            st.stop()
        return None, None
    labels = [str(p.relative_to(results_root())) if p.is_relative_to(results_root())
              else f"shipped: {p.relative_to(runs.SHIPPED.parent)}" for p in paths]
    want = st.session_state.get(f"src-{kind}", "")
    match = [i for i, p in enumerate(paths) if str(p).startswith(want)] if want else []
    choice = st.selectbox(f"Saved result ({label})", labels, index=match[0] if match else 0, key=f"pick-{kind}-{fmt}")
    path = paths[labels.index(choice)]
    try:
        return path, open_result(kind, path)
    except HeadwiseError as exc:
        st.error(str(exc))
        st.stop()


def selected_head() -> str | None:
    return st.session_state.get("head")


def select_head(head: str) -> None:
    """Select ``head`` on every page (applied on the next run, before the sidebar widget is drawn)."""
    if head != st.session_state.get("head"):
        st.session_state["head_pending"] = head
        st.rerun()


def clicked_head(event) -> None:
    """Select the head of a clicked heat-map cell whose customdata starts with its id (``"L3H1"``)."""
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    if points and points[0].get("customdata"):
        cd = points[0]["customdata"]
        select_head(cd[0] if isinstance(cd, (list, tuple)) else cd)


def head_scores(kind: str, result) -> None:
    """The selected head's scores in this result (from the result's own tidy frame)."""
    head = selected_head()
    if not head:
        return
    df = result_scores(kind, result)
    layer, h = (int(x) for x in head[1:].split("H"))
    mine = df[(df["layer"] == layer) & (df["head"] == h)][["metric", "value"]]
    st.caption(f"Selected head **{head}**: " + (", ".join(f"{m} = {v:.3g}" for m, v in mine.itertuples(index=False))
                                                 if len(mine) else "no score in this result"))


@st.cache_data(show_spinner="Collecting saved scores…", max_entries=16)
def cached_atlas(model_id: str, n_layers: int, n_heads: int, files: tuple) -> tuple:
    """Per-head scores and roles of the newest saved result of each analysis (and result type) made
    for ``model_id``; ``files``: ``(kind, path, mtime)`` newest first."""
    from analyses.atlas import head_roles, merge_roles

    frames, roles, used, seen = [], [], [], set()
    for kind, path, mtime in files:
        try:
            res = cached_result(kind, path, mtime)
            tag = (kind, type(res).__name__)
            if tag in seen or getattr(res, "model_id", None) != model_id:
                continue
            df = result_scores(kind, res)
        except (HeadwiseError, OSError, ValueError, KeyError):
            continue
        if len(df) and (df["layer"].max() >= n_layers or df["head"].max() >= n_heads):
            continue
        seen.add(tag)
        frames.append(df)
        roles.append(head_roles(kind, res))
        used.append((kind, path))
    return frames, merge_roles(*roles), used


def atlas_inputs(model) -> tuple:
    files = [(kind, str(p), p.stat().st_mtime) for kind, paths in runs.find(results_root(), shipped=True).items()
             for p in paths]
    return cached_atlas(model.model_id, model.n_layers, model.n_heads, tuple(files))


def clickable_heads(fig, n_layers: int, n_heads: int, trace: int = 0, transpose: bool = False):
    """Give a layer x head heat map (``z[layer][head]``, or ``[head][layer]`` with ``transpose``) head ids as
    customdata so a click selects the head; returns the figure."""
    import numpy as np

    ids = np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)], dtype=object)
    fig.data[trace].customdata = ids.T if transpose else ids
    return fig


def source_caption(path, result, model) -> None:
    mid = getattr(result, "model_id", "?")
    note = "" if mid == model.model_id else f" — made for **{mid}**, not the selected model"
    st.caption(f"{path} · model {mid}{note}")
