"""Figures and tables that select heads: one head grid everywhere, and a click selects on every page.

Every figure a page shows goes through :func:`show_figure`: its head grids get the model's KV
grouping, layer 0 on top and click markers (:func:`analyses.plots.finish`), the selected head is
outlined, and a click on any cell makes that head the selected one (the sidebar's ``head``, which
lives in the URL). Selection goes through ``on_select`` callbacks, which run before the next
script run, so the sidebar widget is updated before it is drawn and no extra rerun is needed.
"""
from __future__ import annotations

from functools import partial

import streamlit as st

from analyses.plots import clicked_head, finish, has_head_grid, mark_head
from dashboards.common import figure_downloads, get_model, model_name, selected_head, table_download
from probe import HeadId

HEAD_KEY = "head"
OPENS_CARD = "click_opens_card"      # the sidebar's toggle: a click also opens the head card page


def set_head(head: HeadId | None) -> None:
    """Make ``head`` the selected head (from a callback: before the sidebar is drawn)."""
    layout = get_model(model_name()).layout
    if head is not None and 0 <= head.layer < layout.n_layers and 0 <= head.head < layout.n_heads:
        st.session_state[HEAD_KEY] = HeadId(head.layer, head.head)


def _clicked(head: HeadId | None) -> None:
    """A click on a head: select it, and ask ``app.py`` to open its card when the sidebar says so."""
    set_head(head)
    if head is not None and st.session_state.get(OPENS_CARD):
        st.session_state["open_card"] = True


def _chart_clicked(key: str) -> None:
    _clicked(clicked_head(st.session_state.get(key)))


def show_figure(fig, name: str, key: str | None = None, downloads: bool = True):
    """Draw ``fig`` (head grids finished, the selected head outlined, clicks select) with its downloads."""
    key = key or f"chart-{name}"
    fig = finish(fig, get_model(model_name()).layout)
    kwargs = {}
    if has_head_grid(fig):
        mark_head(fig, selected_head())
        kwargs = {"on_select": partial(_chart_clicked, key), "selection_mode": "points"}
    event = st.plotly_chart(fig, key=key, **kwargs)
    if downloads:
        figure_downloads(fig, name)
    return event


def _table_clicked(key: str, frame) -> None:
    rows = st.session_state[key].selection.rows
    if rows:
        row = frame.iloc[rows[0]]
        _clicked(HeadId(int(row["layer"]), int(row["head_index"])))


def head_table(frame, name: str, key: str, **column_config) -> None:
    """A sortable table with ``layer`` and ``head_index`` columns: clicking a row selects its head."""
    st.dataframe(frame, hide_index=True, key=key, on_select=partial(_table_clicked, key, frame),
                 selection_mode="single-row", column_config=column_config or None)
    table_download(frame, name)


def heads_picker(label: str, key: str, *, default=None, max_heads: int | None = None, help: str | None = None):
    """A multi-select of heads (in the URL), with a button adding the selected head."""
    model = get_model(model_name())
    options = model.layout.all_heads()
    if key not in st.session_state:
        st.session_state[key] = list(default if default is not None else [selected_head()])
    cols = st.columns([5, 1])
    chosen = cols[0].multiselect(label, options, key=key, format_func=str, max_selections=max_heads, help=help,
                                 bind="query-params")
    head = selected_head()
    full = max_heads is not None and len(chosen) >= max_heads
    cols[1].button(f"+ {head}", key=f"{key}:add", disabled=head in chosen or full,
                   on_click=lambda: st.session_state.update({key: list(st.session_state[key]) + [head]}),
                   help="add the selected head (click one on any grid)")
    return list(chosen)
