"""Layer and head attention similarity (EchoAtt, LiSA): matrices, head families, the measured cost of sharing."""
import pandas as pd
import streamlit as st

from dashboards.common import (clickable_heads, clicked_head, get_model, head_scores, model_name, reproduce,
                               result_source, results_root, show_figure, show_table, source_caption)

model = get_model(model_name())
st.title("Layer similarity")
st.caption("Cosine and Jensen-Shannon similarity of attention maps between layers and heads; the echo experiment "
           "reuses layer l's pattern in layer l+1 and measures the loss increase; a greedy plan shares layers "
           "under a loss budget.")
path, res = result_source("similarity", "the similarity scan")
source_caption(path, res, model)
head_scores("similarity", res)
c = st.columns(4)
for col, key in zip(c, ("first_pair_cos", "inner_pairs_mean_cos", "plan_shared_layers", "plan_cost")):
    col.metric(res.summary()[key].label, res.summary()[key].text())

tab = st.tabs(["layer matrices", "head families", "head x head", "echo costs"])
with tab[0]:
    metric = st.radio("Metric", ["cos", "js"], horizontal=True, key="sim_metric",
                      format_func={"cos": "cosine", "js": "Jensen-Shannon (bits)"}.get)
    show_figure(res.plot("layers", metric=metric), f"layer_similarity_{metric}", key="sim_layers")
with tab[1]:
    fig = clickable_heads(res.plot("clusters"), res.n_layers, res.n_heads)
    event = show_figure(fig, "head_families", key="sim_clusters", on_select="rerun", selection_mode="points")
    clicked_head(event)
with tab[2]:
    show_figure(res.plot("heads"), "head_similarity", key="sim_heads")
with tab[3]:
    show_figure(res.plot("echo"), "echo_costs", key="sim_echo")
    st.write(f"Sharing plan ({res.plan_variant} heads, budget {res.plan_budget} nats/token): "
             f"blocks {[list(b) for b in res.plan_blocks]}")
    show_table(pd.DataFrame(
        {"pair": [f"{l}->{l + 1}" for l in range(res.n_layers - 1)], "layer cos": res.adjacent("layer"),
         "same-head cos": res.adjacent("same"), "matched-head cos": res.adjacent("matched")}
        | {f"loss +{v}": loss for v, loss in res.echo.items()}), "echo_costs")

with st.expander("Tidy table (layer pairs, head pairs, matches, echo, families)"):
    frame = res.to_frame()
    scope = st.multiselect("Scopes", sorted(frame["scope"].unique()), ["layer", "echo", "family"], key="sim_scopes")
    show_table(frame[frame["scope"].isin(scope)], "similarity")

reproduce(f'''
from analyses.similarity import SimilarityResult
res = SimilarityResult.load({str(path)!r})
# or run it (the page's defaults; files as the CLI writes them):
# from probe import load_model; from dashboards import runs
# runs.run('similarity', load_model({model_name()!r}), {str(results_root())!r})
for kind in ("layers", "clusters", "heads", "echo"):
    res.plot(kind).show()
res.correlations(); res.to_frame()
''')
