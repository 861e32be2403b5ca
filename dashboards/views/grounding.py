"""Grounding from attention (Lookback Lens; PAINT-style boost): token colouring, ROC, mitigation before/after."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

from analyses.grounding import guided_generate, token_scores, token_view_html
from analyses.grounding.plots import token_view
from dashboards.common import (clickable_heads, clicked_head, get_model, head_scores, model_name, reproduce,
                               result_source, show_figure, show_table, source_caption)
from probe import HeadwiseError

model = get_model(model_name())
st.title("Grounding")
st.caption("The lookback ratio (attention on the context vs on new tokens) of every head feeds a logistic-regression "
           "detector of ungrounded answers; mitigation: detector-guided decoding and a boost on context keys.")
path, res = result_source("grounding", "the grounding scan")
source_caption(path, res, model)
head_scores("grounding", res)
s = res.stats
c = st.columns(5)
lo, hi = s.get("auroc_ci", [np.nan, np.nan])
c[0].metric("held-out AUROC", f"{s.get('auroc', np.nan):.3f}", help=f"95% bootstrap interval [{lo:.3f}, {hi:.3f}]")
c[1].metric("mean-ratio baseline", f"{s.get('baseline_auroc', np.nan):.3f}")
c[2].metric("permutation null (95th pct)", f"{s.get('null_q95', np.nan):.3f}", help=f"p = {s.get('perm_p', np.nan):.3g}")
c[3].metric("within-template AUROC", f"{s.get('w_auroc', np.nan):.3f}",
            help="AUROC within prompt templates (confound control: a template detector scores 0.5 here)")
c[4].metric("items (grounded / not)", f"{s.get('n_grounded', '?')} / {s.get('n_not_grounded', '?')}")

tab = st.tabs(["ROC", "detector heads", "mitigation", "token view"])
with tab[0]:
    if not len(res.roc):
        st.info("No held-out ROC in this result.")
    else:
        show_figure(res.plot("roc"), "grounding_roc", key="gr_roc")
        with st.expander("ROC points"):
            show_table(res.roc, "grounding_roc")
with tab[1]:
    L, H = res.head_weights.shape
    event = show_figure(clickable_heads(res.plot(), L, H), "grounding_heads", key="gr_heads", on_select="rerun",
                        selection_mode="points")
    clicked_head(event)
    show_table(res.to_frame(), "grounding")
with tab[2]:
    if len(res.mitigation):
        mit = res.mitigation
        fig = go.Figure([go.Bar(name="grounded", x=mit["condition"], y=mit["grounded_rate"]),
                         go.Bar(name="contradicted", x=mit["condition"], y=mit["contradicted_rate"])])
        fig.update_layout(barmode="group", title=f"Mitigation on {int(mit['n'].iloc[0])} held-out items "
                          "(before = greedy)", yaxis_title="rate", yaxis_range=[0, 1], height=420)
        show_figure(fig, "grounding_mitigation", key="gr_mit")
        show_table(mit, "grounding_mitigation")
    else:
        st.info("This run has no mitigation stage (n_mitigate = 0).")
with tab[3]:
    if res.detector is None:
        st.info("No detector.json next to this result.")
    else:
        det = res.detector
        prompt = st.text_area("Prompt with a context passage", "The capital of France is Lyon, according to the "
                              "new atlas.\nQuestion: What is the capital of France?\nAnswer:", key="gr_prompt")
        if st.button("Generate (detector-guided) and colour each token", key="gr_generate"):
            try:
                out = guided_generate(model, prompt, det, max_new_tokens=12, reading=det.meta.get("reading", "code"))
                toks = [model.tokenizer.decode([t]) for t in out.new_ids]
                st.session_state["gr_view"] = (prompt, toks, token_scores(det, out.row_lr).tolist())
            except HeadwiseError as exc:
                st.error(str(exc))
        if "gr_view" in st.session_state:
            p, toks, sc = st.session_state["gr_view"]
            st.html(token_view_html(toks, sc, p))
            st.download_button("Token view as HTML", token_view_html(toks, sc, p), file_name="token_view.html",
                               mime="text/html", key="gr_view_html", on_click="ignore")
            show_figure(token_view(toks, sc), "grounding_token_view", key="gr_token_fig")

reproduce(f'''
from probe import load_model
from analyses.grounding import GroundingResult, Detector, guided_generate, token_scores, token_view_html
res = GroundingResult.load({str(path)!r})
res.plot().show(); res.stats; res.mitigation
res.plot("roc").show(); res.roc                 # held-out ROC points
det = Detector.load({str(path / "detector.json")!r})
model = load_model({model_name()!r})
out = guided_generate(model, "passage ... Question: ... Answer:", det, max_new_tokens=12)
token_view_html([model.tokenizer.decode([t]) for t in out.new_ids], token_scores(det, out.row_lr))
''')
