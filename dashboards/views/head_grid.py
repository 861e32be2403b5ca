"""Head atlas: the layer x head grid (grouped by KV head) coloured by the statistics of a prompt or by
any saved score of any analysis; hover shows each head's roles; click a head to select it everywhere."""
import streamlit as st

from analyses.atlas import LABELS, atlas
from analyses.patterns import window_figure
from dashboards.common import (CAPTURE_MAX_TOKENS, DEFAULT_PROMPT, cached_capture, cached_grid, get_model, model_name,
                               open_result, reproduce, results_root, saved_results, selected_head, show_figure,
                               show_table)
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


def _opened():
    for saved in saved_results():
        try:
            yield saved.analysis.name, saved.path, open_result(saved)
        except (HeadwiseError, OSError, ValueError, KeyError):
            continue                                        # a damaged result: the others still show


board = atlas(model.model_id, model.layout, _opened(), base=grid)
st.caption(f"Saved scores from {len(board.sources)} result(s) under {results_root()}: "
           + (", ".join(f"{k} ({p.rsplit('/', 1)[-1]})" for k, p in board.sources) or "none yet (run an analysis page)"))
metric = st.selectbox("Colour by", board.grid.metrics(), key="grid_metric", format_func=lambda m: LABELS.get(m, m))
fig = board.grid.plot(metric, roles=board.roles)
head = selected_head()
col = model.layout.grouped_order().index(head.head)
fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=head.layer - 0.5, y1=head.layer + 0.5,
              line={"color": "red", "width": 3})
show_figure(fig, f"head_atlas_{metric.replace(':', '_').replace(' ', '_')}", key="grid_chart", selects_head=True)
with st.expander("Per-head table (every score shown in the atlas)"):
    show_table(board.grid.to_frame(), "head_atlas")

st.subheader(f"{head} (KV group {model.layout.kv_group(head.head)})")
mine = board.grid.to_frame()
mine = mine[(mine["layer"] == head.layer) & (mine["head"] == head.head)].dropna()
c = st.columns([1, 2])
c[0].write("Roles: " + (", ".join(board.roles.get(head, [])) or "none found in the saved results"))
c[0].dataframe(mine[["metric", "value"]], hide_index=True)
n_tok = grid.meta["n_tokens"]
if n_tok > CAPTURE_MAX_TOKENS:
    c[1].info(f"{n_tok} tokens: the full pattern is too big to draw here; open it in the Pattern explorer.")
else:
    rec = cached_capture(name, text, head.layer, head.head)
    hfig = window_figure(rec.patterns[0, 0].numpy(), rec.tokens, (0, n_tok), (0, n_tok),
                         f"{head} (KV group {model.layout.kv_group(head.head)}): attention pattern")
    with c[1]:
        show_figure(hfig, f"pattern_{head}", key="head_chart")

reproduce(f'''
from probe import HeadId, load_model, capture
from analyses import registry
from analyses.atlas import atlas, head_grid

model = load_model({name!r})
text = {text!r}
grid = head_grid(model, text)            # streamed: works for long prompts too
saved = [(s.analysis.name, s.path, s.load()) for s in registry.find_results({str(results_root())!r})]
board = atlas(model.model_id, model.layout, saved, base=grid)
board.grid.plot({metric!r}, roles=board.roles).show()
rec = capture(model, text, layers=[{head.layer}], heads=[{head.head}])
rec.pattern(HeadId({head.layer}, {head.head}))   # {head}: [query_pos, key_pos]
''')
