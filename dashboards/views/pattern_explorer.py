"""Pattern explorer: a pooled overview of the selected head's whole pattern (long contexts), a click on it
centres an exact token window; find a token to jump there. Runs are cached per text and layer (window
moves and head changes reuse them). Or open a `headwise capture` record / `headwise stats` file."""
import numpy as np
import streamlit as st

from analyses.patterns import MAX_CELLS, window_figure
from dashboards.common import (DEFAULT_PROMPT, explorer_overview, explorer_rows, get_model, model_name,
                               open_explorer, reproduce, selected_head, table_download)
from dashboards.grids import set_head, show_figure
from analyses.views import open_record, stats_rows
from probe import AttentionRecord, HeadId, HeadwiseError

name = model_name()
model = get_model(name)
st.title("Pattern explorer")
st.caption("The overview pools the pattern chunk by chunk as the model runs (never T x T in memory); "
           f"at most {MAX_CELLS} x {MAX_CELLS} cells reach the browser. Click a cell to zoom there.")
head = selected_head()
st.session_state["pe_layer"], st.session_state["pe_head"] = head.layer, head.head     # follow the selection


def _layer_changed():
    set_head(HeadId(int(st.session_state["pe_layer"]), head.head))


def _head_changed():
    set_head(HeadId(head.layer, int(st.session_state["pe_head"])))


def _centre(key: str, size: int) -> None:
    """A click on the overview: centre the window on the clicked cell."""
    points = (st.session_state.get(key) or {}).get("selection", {}).get("points", [])
    cd = points[0].get("customdata") if points else None
    if cd:
        st.session_state["pe_q0"], st.session_state["pe_k0"] = max(0, int(cd[0]) - size // 2), max(0, int(cd[1]) - size // 2)


source = st.radio("Source", ["text", "file"], horizontal=True, key="pe_source", bind="query-params",
                  format_func=lambda s: "a text run now" if s == "text" else "a saved capture / stats file")
if source == "file":
    path = st.text_input("File written by `headwise capture --out` (AttentionRecord) or `headwise stats --out` "
                         "(HeadStats)", "", key="pe_file", bind="query-params")
    if not path:
        st.stop()
    try:
        opened = open_record(path)
    except (HeadwiseError, OSError) as exc:
        st.error(f"{type(exc).__name__}: {exc}")
        st.stop()
    if isinstance(opened, AttentionRecord):
        st.write(f"Attention record of **{opened.model_id}**: layers {list(opened.layers)}, heads "
                 f"{list(opened.heads)}, {len(opened.tokens)} tokens")
        if head.layer not in opened.layers or head.head not in opened.heads:
            st.info(f"{head} is not in this record: select one of its heads.")
            st.stop()
        T = len(opened.tokens)
        show_figure(window_figure(opened.pattern(head).numpy(), opened.tokens, (0, T), (0, T),
                                  f"{head} in {path}"), f"record_{head}", key="pe_record")
    else:
        from analyses.atlas import HeadGrid

        st.write(f"Streaming statistics of **{opened.model_id}**: layers {len(opened.layers)}, "
                 f"{opened.entropy.shape[2]} query rows, key groups {list(opened.group_names) or 'none'}")
        grid = HeadGrid(opened.model_id, model.layout, opened.to_frame(), {"n_tokens": int(opened.entropy.shape[2])})
        metric = st.selectbox("Colour by", grid.metrics(), key="pe_stats_metric", bind="query-params")
        show_figure(grid.plot(metric), f"stats_{metric}", key="pe_stats_grid")
        if head.layer in opened.layers:
            show_figure(stats_rows(opened, head), f"stats_rows_{head}", key="pe_stats_rows")
    st.stop()

c = st.columns([3, 1])
base = c[0].text_area("Text", DEFAULT_PROMPT, key="pe_text", height=90, bind="query-params")
repeat = c[1].number_input("Repeat the text (long context)", 1, 2000, 40 if model.n_ctx >= 2048 else 2,
                           key="pe_repeat", bind="query-params")
text = " ".join([base] * int(repeat))
c = st.columns(4)
c[0].number_input("Layer", 0, model.n_layers - 1, key="pe_layer", on_change=_layer_changed)
c[1].selectbox("Head", model.layout.grouped_order(), key="pe_head", on_change=_head_changed,
               format_func=lambda h: f"kv{model.layout.kv_group(h)}:h{h}")
mode = c[2].radio("Pooling", ["max", "mean"], horizontal=True, key="pe_mode", bind="query-params")
cells = c[3].select_slider("Cells per side", [32, 64, 128, 256], 128, key="pe_cells", bind="query-params")
try:
    ex = open_explorer(name, text)
    pooled = explorer_overview(name, text, head.layer, mode, int(cells))
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()

T = pooled.n_tokens
st.write(f"{T} tokens · {pooled.block} tokens per cell")
size = int(st.select_slider("Zoom window (tokens per side)", [16, 32, 64, 128, 256], 64, key="pe_size",
                            bind="query-params"))
size = min(size, T)
fig = pooled.plot(head.head)
st.plotly_chart(fig, key="pe_overview", on_select=lambda: _centre("pe_overview", size), selection_mode="points")
with st.expander("Pooled table"):
    frame = pooled.to_frame()
    frame = frame[frame["head"] == head.head]
    st.dataframe(frame, hide_index=True)
    table_download(frame, f"pooled_{head}")


def _jump(pos: int) -> None:
    st.session_state["pe_q0"] = max(0, min(T - size, pos))
    st.session_state["pe_k0"] = max(0, min(T - size, pos - size // 2))


c = st.columns([2, 2, 1])
find = c[0].text_input("Find a token (jump the window to it)", "", key="pe_find", bind="query-params")
hits = ex.find(find) if find else []
if find and not hits:
    c[1].warning(f"{find!r} does not occur in the text.")
if hits:
    pick = c[1].selectbox(f"{len(hits)} match(es): token position", hits, key="pe_hit")
    c[2].button(f"Jump to {pick}", key="pe_jump", on_click=_jump, args=(int(pick),))
for k in ("pe_q0", "pe_k0"):                                  # keep a stored start inside this text
    if st.session_state.get(k, 0) > T - size:
        st.session_state[k] = max(0, T - size)
c = st.columns(2)
q0 = int(c[0].number_input("Query window start", 0, max(0, T - size), max(0, T - size), key="pe_q0",
                           bind="query-params"))
k0 = int(c[1].number_input("Key window start", 0, max(0, T - size), max(0, T - size), key="pe_k0",
                           bind="query-params"))
queries, keys = (q0, min(T, q0 + size)), (k0, min(T, k0 + size))
rows = explorer_rows(name, text, head.layer, queries)
win = rows.window(head.head, queries, keys)
outside = rows.outside(head.head, queries, keys)
wfig = window_figure(win, ex.tokens, queries, keys, f"{head}: queries {queries}, keys {keys}")
show_figure(wfig, f"window_{head}", key="pe_window")
st.caption(f"Exact attention; each query row puts on average {float(np.mean(outside)):.3f} of its attention on keys "
           "outside this window.")

reproduce(f'''
from probe import load_model
from analyses.explorer import Explorer
from analyses.patterns import window_figure

model = load_model({name!r})
ex = Explorer.open(model, " ".join([{base!r}] * {int(repeat)}))
ex.overview({head.layer}, {int(cells)}, {mode!r}).plot({head.head}).show()
rows = ex.rows({head.layer}, {queries[0]}, {queries[1]})        # every head of the layer; cache it to move the window
window_figure(rows.window({head.head}, {queries}, {keys}), ex.tokens, {queries}, {keys}, "{head}").show()
# or one window in one call: pattern_window(model, text, layer={head.layer}, queries={queries}, keys={keys})
''')
