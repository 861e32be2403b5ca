"""Head grid: per-head statistics of a prompt on a layer x head map; select a head to see its pattern."""
import streamlit as st

from analyses.atlas import LABELS
from analyses.patterns import window_figure
from dashboards.common import (CAPTURE_MAX_TOKENS, DEFAULT_PROMPT, cached_capture, cached_grid, figure_downloads,
                               get_model, model_name, reproduce, table_download)
from probe import HeadwiseError

name = model_name()
model = get_model(name)
st.title("Head grid")
text = st.text_area("Prompt", DEFAULT_PROMPT, key="grid_prompt", height=90)
try:
    grid = cached_grid(name, text)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()

metric = st.radio("Colour by", grid.metrics(), horizontal=True, key="grid_metric",
                  format_func=lambda m: LABELS.get(m, m))
fig = grid.plot(metric)
event = st.plotly_chart(fig, key="grid_chart", on_select="rerun", selection_mode="points")
points = (event or {}).get("selection", {}).get("points", []) if event else []
if points and "customdata" in points[0]:
    st.session_state["grid_head"] = points[0]["customdata"][0]      # click a cell to select its head
figure_downloads(fig, f"head_grid_{metric}")
with st.expander("Per-head table"):
    st.dataframe(grid.to_frame(), hide_index=True)
    table_download(grid.to_frame(), "head_grid")

heads = [f"L{l}H{h}" for l in range(model.n_layers) for h in model.layout.grouped_order()]
if st.session_state.get("grid_head") not in heads:
    st.session_state["grid_head"] = heads[0]
head = st.selectbox("Head (or click a cell above)", heads, key="grid_head")
layer, h = (int(x) for x in head[1:].split("H"))
n_tok = grid.meta["n_tokens"]
if n_tok > CAPTURE_MAX_TOKENS:
    st.info(f"{n_tok} tokens: the full pattern is too big to draw here; open it in the Pattern explorer.")
else:
    rec = cached_capture(name, text, layer, h)
    pat = rec.patterns[0, 0].numpy()
    hfig = window_figure(pat, rec.tokens, (0, n_tok), (0, n_tok),
                         f"{head} (KV group {model.layout.kv_group(h)}): attention pattern")
    st.plotly_chart(hfig, key="head_chart")
    figure_downloads(hfig, f"pattern_{head}")

reproduce(f'''
from probe import load_model, capture
from analyses.atlas import head_grid

model = load_model({name!r})
text = {text!r}
grid = head_grid(model, text)            # streamed: works for long prompts too
grid.plot({metric!r}).show()
grid.to_frame()                          # tidy: layer, head, metric, value
rec = capture(model, text, layers=[{layer}], heads=[{h}])
rec.patterns[0, 0]                       # {head}: [query_pos, key_pos]
''')
