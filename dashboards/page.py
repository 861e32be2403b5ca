"""The page of any registered analysis, drawn from its registry entry and what its result returns.

Top to bottom: the title and paper; a run form generated from the analysis' config (defaults:
``config.small(model)``) whose button runs it on the selected model into the results folder, with a
progress bar fed by the runner; the saved result to show; its headline numbers; the selected head's
scores; then the result's own :meth:`~analyses.contract.Result.sections` (figures with their
pickers, tables, notes, downloads and interactive tools) and a notebook snippet. Nothing here knows
any particular analysis.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from analyses import registry, run
from analyses.layout import Download, Figure, Note, Section, Table, Tool
from dashboards.common import (get_model, label_of, model_name, open_result, reproduce, result_dir, results_root,
                               run_folder, saved_results, selected_head, show_table, source_caption)
from dashboards.forms import config_form
from dashboards.grids import show_figure
from dashboards.progress import LiveProgress, layer_ticks, was_cancelled
from probe import HeadwiseError


def analysis_page(name: str) -> None:
    analysis = registry.get(name)
    model = get_model(model_name())
    st.title(analysis.title)
    st.caption(f"{analysis.description} — {analysis.paper} ([paper]({analysis.url}); {analysis.methods})")
    run_form(analysis, model)
    saved = [s for s in saved_results() if s.analysis.name == name]
    if not saved:
        st.info(f"No saved {analysis.title.lower()} results under {results_root()}: run it above, or point the "
                f"sidebar's results folder at the output of `headwise scan {name} --out DIR`.")
        st.stop()
    chosen = pick(analysis, saved)
    try:
        result = open_result(chosen)
    except HeadwiseError as exc:
        st.error(str(exc))
        st.stop()
    source_caption(chosen, result, model)
    small_run(analysis, result)
    headline(result)
    head_caption(result)
    ctx = {"name": name, "result": result, "model": model, "calls": []}
    draw(result.sections(), ctx)
    reproduce(snippet(analysis, chosen, result, ctx["calls"]))


def run_form(analysis, model) -> None:
    """The run expander: a form for the config and the button that runs it, with progress, ETA and Cancel."""
    key = f"{analysis.name}:run"
    cancelled = was_cancelled(key)
    with st.expander(f"Run {analysis.title.lower()} on {model.model_id} (small defaults; files go to the "
                     "results folder)", expanded=cancelled):
        try:
            config = config_form(analysis.config, analysis.config.small(model), f"{analysis.name}:config")
        except HeadwiseError as exc:
            st.error(f"{type(exc).__name__}: {exc}")
            return
        if not st.button(f"Run {analysis.title.lower()}", key=key, type="primary"):
            return
        folder = run_folder(analysis, model, config)
        try:
            with LiveProgress(f"{analysis.title} on {model.model_id}", key) as bar:
                run(analysis, model, config, store=folder,
                    progress=lambda p: bar.update(p.done, p.total, f"{p.stage} (units)"))
        except HeadwiseError as exc:
            st.error(f"{type(exc).__name__}: {exc}")
            return
        st.session_state[f"{analysis.name}:source"] = str(folder)
        st.session_state.pop(f"{analysis.name}:pick", None)          # show the new result


def pick(analysis, saved):
    """The saved result to show: the run just made, else the one picked before (kept for the session), else the newest."""
    labels = [label_of(s) for s in saved]
    key = f"{analysis.name}:pick"
    want = st.session_state.pop(f"{analysis.name}:source", None)
    if want is not None:
        st.session_state[key] = next((label_of(s) for s in saved if str(s.path) == want), labels[0])
    if st.session_state.get(key) not in labels:
        st.session_state.pop(key, None)
    choice = st.selectbox(f"Saved result ({analysis.title.lower()})", labels, key=key, persist_state="session")
    return saved[labels.index(choice)]


def small_run(analysis, result) -> None:
    """A visible warning when the result rests on fewer samples than the analysis needs to be more than an example."""
    n = result.n_samples()
    if n >= analysis.min_samples:
        return
    cis = [f"{s.label} {s.text()}" + (f" (n = {s.n})" if s.n is not None else "")
           for s in result.summary().values() if s.ci is not None]
    st.warning(f"**Small run: n = {n}** (below the {analysis.min_samples} {analysis.title.lower()} needs for a "
               "result); treat these numbers as an illustration. "
               + (f"Intervals: {'; '.join(cis)}. " if cis else "No interval can be given at this size. ")
               + f"For the full run: `headwise scan {analysis.name} --out DIR` (its defaults).", icon=":material/science:")


def headline(result) -> None:
    stats = list(result.summary().values())
    for row in range(0, len(stats), 5):
        cols = st.columns(min(5, len(stats) - row))
        for col, stat in zip(cols, stats[row:row + 5]):
            col.metric(stat.label, stat.text(), help=stat.help() or None)


def head_caption(result) -> None:
    """The selected head's scores in this result."""
    head = selected_head()
    scores = {k: float(m[head.layer, head.head]) for k, m in result.head_scores().items()
              if head.layer < m.shape[0] and head.head < m.shape[1] and np.isfinite(m[head.layer, head.head])}
    st.caption(f"Selected head **{head}**: " + (", ".join(f"{k} = {v:.3g}" for k, v in scores.items())
                                                 or "no score in this result"))


# ----------------------------------------------------------------------------- sections

def draw(items, ctx) -> None:
    for item in items:
        draw_item(item, ctx)


def draw_item(item, ctx) -> None:
    if isinstance(item, Section):
        draw_section(item, ctx)
    elif isinstance(item, Figure):
        draw_figure(item, ctx)
    elif isinstance(item, Table):
        show_table(item.frame, f"{ctx['name']}_{item.name or item.title}".replace(" ", "_"))
    elif isinstance(item, Note):
        st.markdown(item.text)
    elif isinstance(item, Download):
        st.download_button(item.label, item.data, file_name=item.file_name, mime=item.mime,
                           key=f"{ctx['name']}:download:{item.file_name}", on_click="ignore")
    elif isinstance(item, Tool):
        draw_tool(item, ctx)


def _title(item) -> str:
    """A tab's title: a section's or table's title, a figure's kind, a tool's label."""
    if isinstance(item, (Section, Table)):
        return item.title
    if isinstance(item, Figure):
        return item.kind
    return item.label if isinstance(item, (Tool, Download)) else ""


def draw_section(sec: Section, ctx) -> None:
    if sec.arrange == "tabs":
        for tab, item in zip(st.tabs([_title(i) for i in sec.items]), sec.items):
            with tab:
                draw(item.items if isinstance(item, Section) else (item,), ctx)
        return
    if sec.arrange == "expander":
        with st.expander(sec.title):
            draw(sec.items, ctx)
        return
    if sec.title:
        st.subheader(sec.title)
    if sec.arrange == "columns":
        for col, item in zip(st.columns(len(sec.items)), sec.items):
            with col:
                draw_item(item, ctx)
    else:
        draw(sec.items, ctx)


def draw_figure(fig: Figure, ctx) -> None:
    name, chosen = ctx["name"], dict(fig.fixed)
    for opt, values in fig.choices.items():
        chosen[opt] = st.radio(opt, list(values), horizontal=True, key=f"{name}:{fig.kind}:{opt}",
                               bind="query-params")
    ctx["calls"].append((fig.kind, chosen))
    file = "_".join([name, fig.kind] + [str(v) for v in chosen.values()])
    show_figure(ctx["result"].plot(fig.kind, **chosen), file, key=f"{name}:{fig.file_name()}")


def draw_tool(tool: Tool, ctx) -> None:
    key = f"{ctx['name']}:tool:{tool.key}"
    try:
        inputs = config_form(type(tool.inputs), tool.inputs, key)
    except HeadwiseError as exc:
        st.error(str(exc))
        return
    was_cancelled(key)
    if st.button(tool.label, key=key):
        model = ctx["model"]
        calls = tool.forwards(inputs) * model.n_layers if tool.forwards else None
        try:
            with LiveProgress(tool.label, key) as bar, layer_ticks(model, bar, calls):
                st.session_state[f"{key}:output"] = tool.run(model, inputs)
        except HeadwiseError as exc:
            st.error(str(exc))
    out = st.session_state.get(f"{key}:output")
    if out is None:
        return
    for label, text in out.texts.items():
        st.text_area(label, text, key=f"{key}:text:{label}", disabled=True, height=68)
    if out.html:
        st.html(out.html)
    for label, figure in out.figures.items():
        show_figure(figure, f"{ctx['name']}_{label}".replace(" ", "_"), key=f"{key}:figure:{label}")
    for d in out.downloads:
        st.download_button(d.label, d.data, file_name=d.file_name, mime=d.mime, key=f"{key}:download:{d.file_name}",
                           on_click="ignore")


def snippet(analysis, saved, result, calls) -> str:
    """Notebook code that reopens this result, draws the figures as shown and reruns the analysis."""
    cls = type(result)
    cfg = analysis.config
    plots = "\n".join(f"res.plot({kind!r}{''.join(f', {k}={v!r}' for k, v in opts.items())}).show()"
                      for kind, opts in calls)
    return f'''
from analyses import run
from {cls.__module__} import {cls.__name__}
res = {cls.__name__}.load({str(saved.path)!r})
# or run it (the page's small defaults; files as `headwise scan {analysis.name}` writes them):
# from probe import load_model; from {cfg.__module__} import {cfg.__name__}
# model = load_model({model_name()!r})
# res = run({analysis.name!r}, model, {cfg.__name__}.small(model), store={str(result_dir(analysis.name, result.model_id))!r})
{plots}
res.summary(); res.to_frame()
'''
