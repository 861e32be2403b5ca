"""Retrieval heads (Wu et al. 2024): per-head retrieval scores, NIAH success heat maps, top-K vs random masking."""
import streamlit as st

from dashboards.common import (clickable_heads, clicked_head, get_model, head_scores, model_name, reproduce,
                               result_source, results_root, show_figure, show_table, source_caption)

model = get_model(model_name())
st.title("Retrieval heads")
st.caption("Needle-in-a-haystack: a head makes a copy-paste event when its argmax key is in the needle and holds "
           "the emitted token; masking makes the top-K heads (vs random K) uniform while decoding.")
path, res = result_source("retrieval", "the retrieval-head scan")
source_caption(path, res, model)
c = st.columns(4)
for col, stat in zip(c, res.summary().values()):
    col.metric(stat.label, stat.text())
head_scores("retrieval", res)

L, H = res.scores.shape
c = st.columns([3, 2])
with c[0]:
    event = show_figure(clickable_heads(res.plot("heads"), L, H), "retrieval_scores", key="ret_heads",
                        on_select="rerun", selection_mode="points")
    clicked_head(event)
with c[1]:
    show_figure(res.plot("grouped"), "retrieval_grouped", key="ret_grouped")   # GQA: per KV head

st.subheader("NIAH success over context length x needle depth")
conds = ["none"] + (["top", "random"] if len(res.masking) else [])
cols = st.columns(len(conds))
for i, cond in enumerate(conds):
    with cols[i]:
        show_figure(res.plot("niah", condition=cond), f"niah_{cond}", key=f"ret_niah_{cond}")
if len(res.masking):
    show_figure(res.plot("masking"), "retrieval_masking", key="ret_masking")
    st.caption("Masked sets: top = " + ", ".join(map(str, res.top)) + "; " +
               "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in res.random_sets.items()))

tab = st.tabs(["per-head scores", "GQA groups", "samples", "masking runs", "success table"])
with tab[0]:
    show_table(res.to_frame(), "retrieval_heads")
with tab[1]:
    show_table(res.grouped(), "retrieval_grouped")
with tab[2]:
    show_table(res.samples, "retrieval_samples")
with tab[3]:
    show_table(res.masking, "retrieval_masking")
with tab[4]:
    show_table(res.success_table(), "retrieval_success")

reproduce(f'''
from analyses.retrieval import RetrievalResult
res = RetrievalResult.load({str(path)!r})
# or run it (the page's defaults; files as the CLI writes them):
# from probe import load_model; from dashboards import runs
# runs.run('retrieval', load_model({model_name()!r}), {str(results_root())!r})
res.plot("heads").show()
res.plot("grouped").show(); res.plot("masking").show()
for cond in ("none", "top", "random"):
    res.plot("niah", condition=cond).show()
res.to_frame(); res.success_table(); res.retrieval_heads()[:10]
''')
