"""Top heads: every per-head score of every saved result in one sortable table, ranked within its metric.

Filter by analysis and metric; click a row to select that head on every page (its card, its tokens,
the interventions). Each row names the result folder its score comes from."""
import streamlit as st

from analyses.leaderboard import head_rows, head_table
from dashboards.common import get_model, model_name, opened_results, reproduce, selected_head
from dashboards.grids import head_table as show_head_table

model = get_model(model_name())
st.title("Top heads")


every = st.toggle("Every saved result (default: the newest of each analysis)", key="top_every", persist_state="session")
table = head_table(list(opened_results(model.model_id, every)))
if table.empty:
    st.info(f"No saved result for {model.model_id} has per-head scores yet: run an analysis on its page.")
    st.stop()
c = st.columns([2, 3, 1])
analyses = sorted(table["analysis"].unique())
picked = c[0].multiselect("Analyses", analyses, default=analyses, key="top_analyses", bind="query-params")
metrics = sorted(table[table["analysis"].isin(picked)]["metric"].unique())
metric = c[1].selectbox("Metric (all: every metric, ranked within each)", ["all"] + metrics, key="top_metric",
                        bind="query-params")
n = c[2].number_input("Top", 1, 1000, 20, key="top_n", bind="query-params")
rows = table[table["analysis"].isin(picked)]
if metric != "all":
    rows = rows[rows["metric"] == metric]
rows = rows[rows["rank"] <= int(n)].sort_values(["percentile", "value"], ascending=False, kind="stable")
st.caption(f"{len(rows)} rows · rank 1 = the highest value of that metric in that result · click a row to select "
           f"its head (now **{selected_head()}**)")
show_head_table(rows.reset_index(drop=True), "top_heads", key="top_table",
                value=st.column_config.NumberColumn(format="%.4g"),
                percentile=st.column_config.ProgressColumn(min_value=0, max_value=100, format="%.0f"))
head = selected_head()
mine = head_rows(table, head)
st.subheader(f"{head}: {len(mine)} score(s) across the saved results")
st.dataframe(mine[["analysis", "metric", "value", "rank", "of", "percentile", "source"]], hide_index=True)
reproduce(f'''
from analyses import registry
from analyses.leaderboard import head_table
saved = [(s.analysis.name, s.path, s.load()) for s in registry.find_results("results")]
table = head_table(saved)
table[table["rank"] <= {int(n)}]{'' if metric == 'all' else f'.query("metric == {metric!r}")'}
''')
