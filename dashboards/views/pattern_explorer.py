"""Pattern explorer: a pooled overview of a head's whole pattern (long contexts), then a token window."""
import streamlit as st

from analyses.patterns import MAX_CELLS, window_figure
from dashboards.common import (DEFAULT_PROMPT, cached_pooled, cached_window, figure_downloads, get_model,
                               model_name, reproduce, selected_head, table_download)
from probe import HeadId, HeadwiseError

name = model_name()
model = get_model(name)
st.title("Pattern explorer")
st.caption("The overview pools the pattern chunk by chunk as the model runs (never T x T in memory); "
           f"at most {MAX_CELLS} x {MAX_CELLS} cells reach the browser.")
c = st.columns([3, 1])
base = c[0].text_area("Text", DEFAULT_PROMPT, key="pe_text", height=90)
repeat = c[1].number_input("Repeat the text (long context)", 1, 2000, 40 if model.n_ctx >= 2048 else 2,
                           key="pe_repeat")
text = " ".join([base] * int(repeat))
selected = selected_head()
if st.session_state.get("pe_synced") != selected:                   # follow the head selected on any page
    st.session_state.update(pe_layer=selected.layer, pe_head=selected.head, pe_synced=selected)
c = st.columns(4)
st.session_state.setdefault("pe_layer", min(3, model.n_layers - 1))
layer = c[0].number_input("Layer", 0, model.n_layers - 1, key="pe_layer")
head = c[1].selectbox("Head", model.layout.grouped_order(), key="pe_head",
                      format_func=lambda h: f"kv{model.layout.kv_group(h)}:h{h}")
mode = c[2].radio("Pooling", ["max", "mean"], horizontal=True, key="pe_mode")
cells = c[3].select_slider("Cells per side", [32, 64, 128, 256], 128, key="pe_cells")
try:
    pooled = cached_pooled(name, text, int(layer), mode, int(cells))
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()

T = pooled.n_tokens
st.write(f"{T} tokens · {pooled.block} tokens per cell")
fig = pooled.plot(head)
event = st.plotly_chart(fig, key="pe_overview", on_select="rerun", selection_mode="points")
points = event.get("selection", {}).get("points", []) if event else []
size = st.select_slider("Zoom window (tokens per side)", [16, 32, 64, 128, 256], 64, key="pe_size")
if points:                                        # click a cell to centre the window on it
    st.session_state["pe_q0"] = max(0, min(T - 1, int(points[0]["y"])))
    st.session_state["pe_k0"] = max(0, min(T - 1, int(points[0]["x"])))
figure_downloads(fig, f"pooled_{HeadId(int(layer), head)}_{mode}")
with st.expander("Pooled table"):
    frame = pooled.to_frame()
    frame = frame[frame["head"] == head]
    st.dataframe(frame, hide_index=True)
    table_download(frame, f"pooled_{HeadId(int(layer), head)}")

c = st.columns(2)
q0 = c[0].number_input("Query window start", 0, T - 1, max(0, T - size), key="pe_q0")
k0 = c[1].number_input("Key window start", 0, T - 1, max(0, T - size), key="pe_k0")
queries, keys = (int(q0), min(T, int(q0) + size)), (int(k0), min(T, int(k0) + size))
win = cached_window(name, text, int(layer), queries, keys)[head]
wfig = window_figure(win, pooled.tokens, queries, keys, f"{HeadId(int(layer), head)}: queries {queries}, keys {keys}")
st.plotly_chart(wfig, key="pe_window")
figure_downloads(wfig, f"window_{HeadId(int(layer), head)}")

reproduce(f'''
from probe import load_model
from analyses.patterns import pooled_pattern, pattern_window, window_figure

model = load_model({name!r})
text = " ".join([{base!r}] * {int(repeat)})
pooled = pooled_pattern(model, text, layer={int(layer)}, cells={int(cells)}, mode={mode!r})
pooled.plot({head}).show()
win = pattern_window(model, text, layer={int(layer)}, queries={queries}, keys={keys})
window_figure(win[{head}], pooled.tokens, {queries}, {keys}, "{HeadId(int(layer), head)}").show()
''')
