"""Head atlas: the layer x head grid (grouped by KV head) coloured by the statistics of a prompt or by
any saved score of any analysis; hover shows each head's roles; click a head to select it everywhere."""
import streamlit as st

from analyses.atlas import LABELS, score_grid
from analyses.patterns import window_figure
from dashboards.common import (CAPTURE_MAX_TOKENS, DEFAULT_PROMPT, atlas_inputs, cached_capture, cached_grid,
                               clicked_head, get_model, model_name, reproduce, results_root, selected_head,
                               show_figure, show_table)
from probe import HeadwiseError

name = model_name()
model = get_model(name)
st.title("Head atlas")
text = st.text_area("Prompt (for the prompt statistics and the pattern)", DEFAULT_PROMPT, key="grid_prompt", height=68)
try:
    grid = cached_grid(name, text)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()

frames, roles, used = atlas_inputs(model)
atlas = score_grid(model.model_id, model.layout, [grid.to_frame()[["layer", "head", "metric", "value"]]] + frames,
                   grid.meta)
st.caption(f"Saved scores from {len(used)} result(s) under {results_root()}: "
           + (", ".join(f"{k} ({p.rsplit('/', 1)[-1]})" for k, p in used) or "none yet (run an analysis page)"))
metric = st.selectbox("Colour by", atlas.metrics(), key="grid_metric", format_func=lambda m: LABELS.get(m, m))
fig = atlas.plot(metric, roles=roles)
head = selected_head()
if head:
    layer, h = (int(x) for x in head[1:].split("H"))
    col = model.layout.grouped_order().index(h)
    fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                  line={"color": "red", "width": 3})
event = show_figure(fig, f"head_atlas_{metric.replace(':', '_').replace(' ', '_')}", key="grid_chart",
                    on_select="rerun", selection_mode="points")
clicked_head(event)
with st.expander("Per-head table (every score shown in the atlas)"):
    show_table(atlas.to_frame(), "head_atlas")

st.subheader(f"{head} (KV group {model.layout.kv_group(h)})")
mine = atlas.to_frame()
mine = mine[(mine["layer"] == layer) & (mine["head"] == h)].dropna()
c = st.columns([1, 2])
c[0].write("Roles: " + (", ".join(roles.get(head, [])) or "none found in the saved results"))
c[0].dataframe(mine[["metric", "value"]], hide_index=True)
n_tok = grid.meta["n_tokens"]
if n_tok > CAPTURE_MAX_TOKENS:
    c[1].info(f"{n_tok} tokens: the full pattern is too big to draw here; open it in the Pattern explorer.")
else:
    rec = cached_capture(name, text, layer, h)
    hfig = window_figure(rec.patterns[0, 0].numpy(), rec.tokens, (0, n_tok), (0, n_tok),
                         f"{head} (KV group {model.layout.kv_group(h)}): attention pattern")
    with c[1]:
        show_figure(hfig, f"pattern_{head}", key="head_chart")

reproduce(f'''
from probe import load_model, capture
from analyses.atlas import head_grid, result_scores, head_roles, score_grid
from dashboards import runs

model = load_model({name!r})
text = {text!r}
grid = head_grid(model, text)            # streamed: works for long prompts too
saved = runs.find({str(results_root())!r})   # saved results of every analysis
frames = [grid.to_frame()[["layer", "head", "metric", "value"]]]
frames += [result_scores(kind, runs.load(kind, paths[0])) for kind, paths in saved.items() if paths]
atlas = score_grid(model.model_id, model.layout, frames)
atlas.plot({metric!r}).show()
rec = capture(model, text, layers=[{layer}], heads=[{h}])
rec.patterns[0, 0]                       # {head}: [query_pos, key_pos]
''')
