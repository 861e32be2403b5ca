"""Interventions on your own prompt: pick heads (click them on any grid), an edit (zero or mean ablation,
uniform attention, a temperature, a saved ACT calibration), and see the next-token probabilities before
and after, the tokens that moved most, and greedy generations side by side. The edit is active inside
the call only (``probe.intervene``): the shared model and other sessions never see it."""
import streamlit as st

from analyses.compare import EDIT_LABELS, EDITS, compare_edit, edit_spec, head_means
from analyses.sinks import load_calibration
from dashboards import memo
from dashboards.common import get_model, label_of, model_name, reproduce, saved_results, selected_head
from dashboards.grids import heads_picker, show_figure
from dashboards.progress import LiveProgress, was_cancelled
from probe import HeadwiseError

name = model_name()
model = get_model(name)
st.title("Interventions")
prompt = st.text_area("Prompt", "When Mary and John went to the store, John gave a drink to", key="iv_prompt",
                      height=68, bind="query-params")
c = st.columns([2, 1])
kind = c[0].radio("Edit", EDITS, key="iv_edit", horizontal=True, format_func=lambda k: EDIT_LABELS[k].split(" (")[0],
                  bind="query-params", help=" · ".join(f"{k}: {v}" for k, v in EDIT_LABELS.items()))
c[1].caption(EDIT_LABELS[kind])
calibration, temperature = None, 2.0
if kind == "calibration":
    calibs = {label_of(s): s.path / "calib.json" for s in saved_results()
              if s.analysis.name == "sinks" and (s.path / "calib.json").exists()}
    choice = st.selectbox("Calibration (calib.json of a sinks result, or a path)", list(calibs) + ["a path…"],
                          key="iv_calib", bind="query-params")
    path = calibs.get(choice) or st.text_input("calib.json path", "", key="iv_calib_path", bind="query-params")
    if path:
        try:
            calibration = load_calibration(path)
            st.caption(f"{calibration.task or 'untitled'} calibration of {calibration.model_id}: "
                       f"{len(calibration.heads)} head(s) {', '.join(map(str, calibration.heads[:12]))}")
        except (HeadwiseError, OSError) as exc:
            st.error(str(exc))
    heads = list(calibration.heads) if calibration is not None else []
else:
    heads = heads_picker("Heads to edit", "iv_heads", default=[selected_head()])
    if kind == "temperature":
        temperature = st.slider("Temperature t (scores / t; > 1 flattens, < 1 sharpens)", 0.1, 10.0, 2.0, 0.1,
                                key="iv_temp", bind="query-params")
c = st.columns(3)
top = int(c[0].number_input("Tokens shown", 3, 50, 10, key="iv_top", persist_state="session"))
new_tokens = int(c[1].number_input("Tokens generated", 0, 200, 20, key="iv_new", persist_state="session"))
chat = c[2].checkbox("Wrap in the chat template", False, key="iv_chat", persist_state="session")

was_cancelled("iv")
if st.button("Run the intervention", key="iv_run", type="primary"):
    try:
        means = None
        if kind == "mean":
            key = (name, tuple(sorted(heads)))
            with st.spinner("Mean head outputs over the reference texts (once per head set)…"):
                means = memo.table("means", 16).get(key, lambda: head_means(model, heads))
        spec = edit_spec(model, kind, heads, temperature=temperature, calibration=calibration, means=means)
        with LiveProgress(f"Comparing on {model.model_id}", "iv") as bar:
            result = compare_edit(model, prompt, spec, top=top, max_new_tokens=new_tokens, chat=chat,
                                  progress=lambda d, t, what: bar.update(d, t, what))
        st.session_state["iv_result"] = result
    except HeadwiseError as exc:
        st.error(f"{type(exc).__name__}: {exc}")

res = st.session_state.get("iv_result")
if res is None:
    st.info("Pick heads (click any grid's cell, then + here) and an edit, then run it.")
    st.stop()
st.subheader(f"{res.edit}")
b, a = res.top_tokens("before").iloc[0], res.top_tokens("after").iloc[0]
c = st.columns(4)
c[0].metric("top token, plain", repr(b["token"]), f"p = {b['p']:.3f}", delta_color="off")
c[1].metric("top token, edited", repr(a["token"]), f"p = {a['p']:.3f}", delta_color="off")
moved = res.to_frame().iloc[0]
c[2].metric(f"p({moved['token']!r})", f"{moved['p_after']:.3f}", f"{moved['dp']:+.3f} (logit {moved['dlogit']:+.2f})")
c[3].metric("KL(plain ‖ edited)", f"{res.kl:.4g} nats")
show_figure(res.plot(), "intervention_tokens", key="iv_plot")
st.dataframe(res.to_frame(), hide_index=True)
if res.generated.get("plain") or res.generated.get("edited"):
    c = st.columns(2)
    c[0].text_area("Generated, plain", res.generated["plain"], key="iv_gen_plain", disabled=True, height=120)
    c[1].text_area("Generated, edited", res.generated["edited"], key="iv_gen_edited", disabled=True, height=120)
reproduce(f'''
from probe import load_model
from analyses.compare import compare_edit, edit_spec
model = load_model({name!r})
spec = edit_spec(model, {kind!r}, {[str(h) for h in res.heads]!r}{f", temperature={temperature}" if kind == "temperature" else ""})
res = compare_edit(model, {res.prompt!r}, spec, top={top}, max_new_tokens={new_tokens})
res.to_frame(), res.generated, res.kl
''')
