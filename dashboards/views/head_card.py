"""Head card: every score of the selected head with its rank, its roles by each analysis' own rule, and
a sample pattern; step to the neighbouring heads, or open its tokens and interventions."""
import streamlit as st

from dashboards.cards import SAMPLE, basic_card
from dashboards.common import get_model, model_name, opened_results, reproduce, selected_head
from dashboards.grids import set_head, show_figure
from probe import HeadId, HeadwiseError

model = get_model(model_name())
head = selected_head()
L, H = model.n_layers, model.n_heads
st.title("Head card")


def _step(dl: int, dh: int) -> None:
    flat = (head.layer * H + head.head + dl * H + dh) % (L * H)
    set_head(HeadId(flat // H, flat % H))


c = st.columns([4, 1, 1, 1, 1])
c[0].subheader(f"{head} · KV group {model.layout.kv_group(head.head)} · {model.model_id}")
c[1].button("◀ head", key="card_prev", on_click=_step, args=(0, -1))
c[2].button("head ▶", key="card_next", on_click=_step, args=(0, 1))
c[3].button("▲ layer", key="card_up", on_click=_step, args=(-1, 0))
c[4].button("layer ▼", key="card_down", on_click=_step, args=(1, 0))
text = st.text_input("Sample text of the pattern (long texts are pooled)", SAMPLE, key="card_text", bind="query-params")


try:
    card = basic_card(model, head, opened_results(model.model_id), text)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()
st.write("**Roles**: " + ("; ".join(card.roles) or "none in the saved results (run the analyses on their pages)"))
frame = card.to_frame()
if len(frame):
    st.dataframe(frame, hide_index=True, column_config={
        "percentile": st.column_config.ProgressColumn(min_value=0, max_value=100, format="%.0f"),
        "value": st.column_config.NumberColumn(format="%.4g")})
else:
    st.info(f"No saved result for {model.model_id} scores this head yet.")
for kind, draw in card.plots().items():
    show_figure(draw(), f"card_{head}_{kind}", key=f"card_{kind}")
c = st.columns(3)
c[0].page_link("views/token_view.py", label="Its tokens", icon=":material/text_fields:")
c[1].page_link("views/interventions.py", label="Edit it on a prompt", icon=":material/science:")
c[2].page_link("views/top_heads.py", label="All heads ranked", icon=":material/leaderboard:")
reproduce(f'''
from analyses import registry
from analyses.leaderboard import head_rows, head_table
from probe import HeadId
saved = [(s.analysis.name, s.path, s.load()) for s in registry.find_results("results")]
head_rows(head_table(saved), HeadId({head.layer}, {head.head}))
''')
