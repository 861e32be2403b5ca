"""Attention sinks and ACT calibration (Yu et al. 2024): sink map, head search, before/after, the calibration file."""
import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analyses.sinks import Calibration, apply_calibration
from dashboards.common import (get_model, head_scores, model_name, reproduce, result_source, run_button,
                               show_figure, show_table, source_caption)
from probe import HeadwiseError

model = get_model(model_name())
st.title("Sinks and calibration")
st.caption("A key is a sink of a head when its column-mean attention exceeds tau; ACT calibration scales the "
           "attention on the other sinks by beta in the heads whose lone calibration helps a task.")
run_button("sinks", "the sink profile and ACT head search")

st.header("Sink map")
ppath, prof = result_source("sinks", "sink profile", fmt="headwise.sink_profile", run=False, stop=False)
if prof is not None:
    source_caption(ppath, prof, model)
    head_scores("sinks", prof)
    what = st.radio("Show", ["mass", "sinks"], horizontal=True, key="sink_metric",
                    format_func={"mass": "attention mass by token type", "sinks": "calibratable sinks per prompt"}.get)
    show_figure(prof.plot(what), f"sink_map_{what}", key="sink_map")
    summ = prof.summary()
    with st.expander("Sinks by token type; every sink found"):
        show_table(pd.DataFrame(summ["token_types"]).T.reset_index(names="type"), "sink_types")
        show_table(prof.sinks, "sinks")

st.header("Head search and calibration")
spath, search = result_source("sinks", "ACT head search", fmt="headwise.act_search", run=False, stop=False)
if search is None:
    st.stop()
source_caption(spath, search, model)
head_scores("sinks", search)
metric = st.radio("Per candidate head", ["delta_accuracy", "delta_gold_logprob"], horizontal=True, key="act_metric")
show_figure(search.plot(metric), f"act_search_{metric}", key="act_search")

f = search.figures()
rnd = f["heldout_random_accuracy"]
names = ["plain", f"calibrated ({f['n_selected']} heads)"] + ([f"random heads ({rnd['n']} seeds)"] if rnd["n"] else [])
vals = [f["heldout_plain"]["accuracy"], f["heldout_calibrated"]["accuracy"]] + ([rnd["mean"]] if rnd["n"] else [])
errs = [0, 0] + ([rnd["std"]] if rnd["n"] else [])
bar = go.Figure(go.Bar(x=names, y=vals, error_y={"type": "data", "array": errs}, text=[f"{v:.3f}" for v in vals],
                       textposition="outside", marker_color=["#888", "#2a7", "#c84"][:len(vals)]))
bar.update_layout(title=f"Held-out accuracy before/after calibration ({search.task}, {search.shots}-shot)",
                  yaxis_title="accuracy", yaxis_range=[0, 1.05], height=380)
show_figure(bar, "act_before_after", key="act_bar")
st.write("Kept heads: " + (", ".join(search.selected) or "none (no head helped on the calibration split)"))

calib = Calibration.from_search(search)
st.download_button("Download the calibration file (calib.json)", json.dumps(calib.to_dict(), indent=2),
                   file_name="calib.json", mime="application/json", key="calib-download")
st.caption("Apply it at inference: `headwise generate --calibration calib.json \"prompt\"` or "
           "`apply_calibration(model, \"calib.json\")` on a plain Hugging Face model.")

st.subheader("Before/after on your prompt")
prompt = st.text_input("Prompt", "Review: The plot was dull and the acting wooden.\nSentiment:", key="act_prompt")
if st.button("Generate with and without calibration", key="act_generate"):
    import torch
    try:
        ids = model.encode(prompt)
        outs = {}
        for label in ("plain", "calibrated"):
            handle = apply_calibration(model, calib) if label == "calibrated" else None
            try:
                with torch.no_grad():
                    out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                            do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
            finally:
                if handle is not None:
                    handle.remove()
            outs[label] = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        st.session_state["act_outputs"] = outs
    except HeadwiseError as exc:
        st.error(str(exc))
for label, text in st.session_state.get("act_outputs", {}).items():
    st.text_area(label, text, key=f"act_out_{label}", disabled=True, height=68)

with st.expander("Per-candidate table"):
    show_table(search.to_frame(), "act_search")

reproduce(f'''
from probe import load_model
from analyses.sinks import SinkProfile, SearchResult, Calibration, apply_calibration
{f"prof = SinkProfile.load({str(ppath)!r}); prof.plot({what!r}).show()" if prof is not None else ""}
search = SearchResult.load({str(spath)!r})
search.plot({metric!r}).show(); search.figures()
calib = Calibration.from_search(search); calib.save("calib.json")
model = load_model({model_name()!r})
handle = apply_calibration(model, "calib.json")   # forward and generate; handle.remove() to undo
''')
