"""Head card: every score of the selected head with its rank, its roles by each analysis' own rule, the
transfer cells it takes part in, and a sample pattern; step to the neighbouring heads, or open its
tokens and interventions. The card is the cross-analysis study's (``analyses.atlas.card.head_card``)
when a saved study of this model exists, else one built from each analysis' newest saved result."""
import streamlit as st

from dashboards.cards import CARD_CELLS, SAMPLE, card_for
from dashboards.common import (explorer_overview, get_model, model_name, opened_results, reproduce, results_root,
                               selected_head)
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
    pattern = explorer_overview(model_name(), text, head.layer, "max", CARD_CELLS)
    card, study = card_for(model, head, opened_results(model.model_id), pattern)
except HeadwiseError as exc:
    st.error(str(exc))
    st.stop()
if study is not None:
    st.caption(f"The cross-analysis study's card, from `{study}`: every score of the study ranked over all heads "
               "(rank 1 = the highest), the roles, and the transfer cells the head takes part in.")
else:
    st.caption("No saved cross-analysis study of this model (`headwise scan atlas --out DIR`, or its page): the "
               "card ranks the scores of each analysis' newest saved result; the study adds agreement and transfer.")
st.write("**Roles**: " + ("; ".join(card.roles) or "none in the saved results (run the analyses on their pages)"))
frame = card.to_frame().drop(columns=["layer", "head"], errors="ignore")
if len(frame):
    st.dataframe(frame, hide_index=True, column_config={
        "percentile": st.column_config.ProgressColumn(min_value=0, max_value=100, format="%.0f"),
        "value": st.column_config.NumberColumn(format="%.4g")})
else:
    st.info(f"No saved result for {model.model_id} scores this head yet.")
cells = getattr(card, "cells", None)
if cells is not None and len(cells):
    st.write(f"**Transfer cells** with {head} among the knocked-out heads (drop = plain - knocked out, 95% interval):")
    st.dataframe(cells, hide_index=True)
for kind, draw in card.plots().items():
    show_figure(draw(), f"card_{head}_{kind}", key=f"card_{kind}")
c = st.columns(3)
c[0].page_link("views/token_view.py", label="Its tokens", icon=":material/text_fields:")
c[1].page_link("views/interventions.py", label="Edit it on a prompt", icon=":material/science:")
c[2].page_link("views/top_heads.py", label="All heads ranked", icon=":material/leaderboard:")
reproduce(f'''
from probe import load_model
from analyses.atlas.card import saved_card
model = load_model({model_name()!r})
card = saved_card({str(head)!r}, model, [{str(results_root())!r}], text={text!r})   # the study's card, else the analyses' own
print(card.text()); card.to_frame()
''')
