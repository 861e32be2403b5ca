"""Circuits across tasks (Merullo et al. 2024): overlap matrix with intervals and a random null, per-task maps."""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboards.common import (clickable_heads, clicked_head, get_model, head_scores, model_name, reproduce,
                               result_source, results_root, show_figure, show_table, source_caption)

model = get_model(model_name())
st.title("Circuits")
st.caption("Per task, exact activation patching (and EAP, EAP-IG) scores every head; the circuit is the top "
           "fraction by |score|; circuits of different tasks are compared with bootstrap intervals and a random null.")
path, res = result_source("circuits", "the circuits scan")
source_caption(path, res, model)
head_scores("circuits", res)

metric = st.radio("Overlap", ["jaccard", "overlap_coefficient"], horizontal=True, key="circ_metric")
m = res.overlap_matrix(metric)
fig = go.Figure(go.Heatmap(z=m.values, x=list(m.columns), y=list(m.index), zmin=0, zmax=1, colorscale="Viridis",
                           text=m.round(2).values, texttemplate="%{text}", colorbar={"title": metric}))
fig.update_layout(title=f"Circuit overlap across tasks ({metric}; {res.model_id})", height=420,
                  yaxis_autorange="reversed")
c = st.columns([2, 3])
with c[0]:
    show_figure(fig, f"circuit_overlap_{metric}", key="circ_overlap")
with c[1]:
    ov = res.overlap[res.overlap["metric"] == metric]
    st.write("Pairs: value with 95% bootstrap interval over prompts, random-head null mean / 95th percentile, p.")
    show_table(ov, f"circuit_overlap_{metric}")

st.subheader("Per-task head maps")
c = st.columns(2)
task = c[0].selectbox("Task", [t.task for t in res.tasks], key="circ_task")
method = c[1].radio("Method", list(res.task(task).effects), horizontal=True, key="circ_method")
t = res.task(task)
L, H = t.scores(method).shape
fig = clickable_heads(t.plot(method), L, H)
event = show_figure(fig, f"circuit_{task}_{method}", key="circ_task_map", on_select="rerun", selection_mode="points")
clicked_head(event)
acc = {k: v for k, v in t.accuracy.items() if isinstance(v, (int, float))}
faith = {k: v for k, v in t.faithfulness.items() if isinstance(v, (int, float))}
st.write(f"Circuit ({len(t.circuit)} heads, {t.rule.get('rule', '')}): " + ", ".join(map(str, t.circuit)))
st.dataframe(pd.DataFrame([acc | {f"faithfulness {k}": v for k, v in faith.items()} | t.method_agreement()]),
             hide_index=True)

tab = st.tabs(["circuit heads and roles", "all scores", "intervention"])
with tab[0]:
    show_table(res.circuit_roles(), "circuit_roles")
with tab[1]:
    show_table(res.to_frame(), "circuits")
with tab[2]:
    st.json(res.repair.to_dict() if res.repair else {"note": "needs the ioi and colored_objects tasks in the scan"})

reproduce(f'''
from analyses.circuits import CircuitsResult
res = CircuitsResult.load({str(path)!r})
# or run it (the page's defaults; files as the CLI writes them):
# from probe import load_model; from dashboards import runs
# runs.run('circuits', load_model({model_name()!r}), {str(results_root())!r})
res.overlap_matrix({metric!r}); res.overlap
res.plot("overlap", metric={metric!r}).show()
res.task({task!r}).plot({method!r}).show()
res.circuit_roles()
''')
