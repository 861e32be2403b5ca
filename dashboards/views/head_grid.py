"""Head atlas: the layer x head grid (grouped by KV head) coloured by the statistics of a prompt or by
any saved score of any analysis; each score names the result it comes from, and which result of an
analysis is used is yours to choose; hover shows each head's roles; click a head to select it everywhere."""
import streamlit as st

from analyses.atlas import LABELS, atlas
from analyses.patterns import window_figure
from dashboards.common import (CAPTURE_MAX_TOKENS, DEFAULT_PROMPT, cached_capture, cached_grid, get_model, label_of,
                               model_name, open_result, reproduce, results_root, saved_results, selected_head,
                               show_table)
from dashboards.grids import show_figure
from probe import HeadwiseError

name = model_name()
model = get_model(name)
st.title("Head atlas")
text = st.text_area("Prompt (for the prompt statistics and the pattern)", DEFAULT_PROMPT, key="grid_prompt",
                    height=68, bind="query-params")
try:
    grid = cached_grid(name, text)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()


def _mine():
    """Saved results made for this model, per analysis (newest first)."""
    out: dict[str, list] = {}
    for saved in saved_results():
        try:
            res = open_result(saved)
        except (HeadwiseError, OSError, ValueError, KeyError):
            continue                                        # a damaged result: the others still show
        if res.model_id == model.model_id:
            out.setdefault(saved.analysis.name, []).append((saved, res))
    return out


mine = _mine()
chosen = []
with st.expander(f"Sources: {sum(map(len, mine.values()))} saved result(s) for {model.model_id} under "
                 f"{results_root()} (and shipped runs); choose which one each analysis' scores come from",
                 expanded=any(len(v) > 1 for v in mine.values())):
    if not mine:
        st.write("none yet: run an analysis on its page, or point the sidebar's results folder at `headwise scan` output")
    for analysis, items in mine.items():
        labels = [label_of(s) for s, _ in items]
        pick = st.selectbox(analysis, labels, key=f"atlas_source_{analysis}", persist_state="session")
        saved, res = items[labels.index(pick)]
        chosen.append((analysis, saved.path, res))
board = atlas(model.model_id, model.layout, chosen, base=grid)
sources = {k: p for k, p in board.sources}
st.caption("Scores: prompt statistics of the text above" + "".join(f"; **{k}** from `{p}`" for k, p in sources.items()))
metric = st.selectbox("Colour by", board.grid.metrics(), key="grid_metric", format_func=lambda m: LABELS.get(m, m),
                      bind="query-params")
source = sources.get(metric.split(":")[0]) if ":" in metric and metric.split(":")[0] in sources else None
fig = board.grid.plot(metric, roles=board.roles)
head = selected_head()
show_figure(fig, f"head_atlas_{metric.replace(':', '_').replace(' ', '_')}", key="grid_chart")
st.caption(f"**{LABELS.get(metric, metric)}** — from " + (f"`{source}`" if source else "the prompt above")
           + ". Click a cell to select its head on every page (to open its card as well: the sidebar's toggle).")
with st.expander("Per-head table (every score shown in the atlas)"):
    show_table(board.grid.to_frame(), "head_atlas")

st.subheader(f"{head} (KV group {model.layout.kv_group(head.head)})")
frame = board.grid.to_frame()
frame = frame[(frame["layer"] == head.layer) & (frame["head"] == head.head)].dropna()
c = st.columns([1, 2])
c[0].write("Roles: " + (", ".join(board.roles.get(head, [])) or "none found in the saved results"))
c[0].dataframe(frame[["metric", "value"]], hide_index=True)
c[0].page_link("views/head_card.py", label=f"{head}'s card", icon=":material/badge:")
c[0].page_link("views/token_view.py", label="its tokens", icon=":material/text_fields:")
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
