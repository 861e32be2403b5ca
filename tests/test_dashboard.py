"""AppTest per dashboard page on tiny-llama, over saved results made by running each analysis on tiny-llama
(grounding: the analysis' own detector fit and result on synthetic features, since a random model never
answers the grounding questions). Analysis pages are the registry's: one generic page per analysis."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from probe import HeadId

APP = str(Path(__file__).resolve().parent.parent / "dashboards" / "app.py")


def switch(app, url_path: str):
    """Open the page registered under ``url_path`` (st.Page hashes are derived from url_path alone)."""
    from streamlit.util import calc_hash

    app._page_hash = calc_hash(url_path)
    return app


@pytest.fixture
def app(monkeypatch, results):
    monkeypatch.setenv("HEADWISE_DASHBOARD_MODEL", "tiny-llama")
    monkeypatch.setenv("HEADWISE_RESULTS", str(results))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _open(app, page: str, title: str):
    (app.switch_page(f"views/{page}.py") if page == "pattern_explorer" else switch(app, page)).run()
    assert not app.exception, app.exception
    assert [t.value for t in app.title] == [title]
    assert not app.error, [e.value for e in app.error]
    others = [w.value for w in app.warning if not w.value.startswith("**Small run")]
    assert not others, others                        # the only warning allowed: a small run says it is one
    return app


def _labels(app) -> list[str]:
    return [b.proto.label for b in app.get("download_button")]


def _code(app) -> str:
    """The page's "reproduce in a notebook" snippet; it must at least be valid Python."""
    code = app.get("code")[-1].value
    compile(code, "snippet", "exec")
    return code


def _run_snippet(code: str, monkeypatch) -> dict:
    """Execute a snippet as a notebook would (figures rendered to JSON instead of a browser)."""
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "json")
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)
    return scope


def test_saved_results_are_found_by_kind(results):
    from analyses import registry

    found = registry.find_results(results)
    counts = {}
    for saved in found:
        counts[saved.analysis.name] = counts.get(saved.analysis.name, 0) + 1
    assert counts == {"retrieval": 1, "sinks": 1, "circuits": 1, "similarity": 1, "grounding": 1, "atlas": 1}
    assert next(s for s in found if s.analysis.name == "sinks").load().search.task == "sentiment"


def test_head_atlas_colours_by_saved_scores_and_selects_a_head(app):
    assert [t.value for t in app.title] == ["Head atlas"] and not app.error
    metrics = app.selectbox(key="grid_metric").options
    assert {"mean entropy (nats)", "retrieval: retrieval_score", "similarity: family", "grounding: coef",
            "sinks: mass:first", "circuits: induction: in circuit"} <= set(metrics)
    assert app.sidebar.selectbox(key="head").options[:4] == ["L0H0", "L0H1", "L0H2", "L0H3"]
    app.selectbox(key="grid_metric").set_value("grounding: coef").run()
    assert not app.exception
    app.sidebar.selectbox(key="head").set_value(HeadId(1, 2)).run()   # selected head: its pattern and its scores
    assert not app.exception and "L1H2" in _code(app)
    assert [s.value for s in app.subheader][0].startswith("L1H2 (KV group 1)")
    assert "retrieval: retrieval_score" in app.dataframe[-1].value["metric"].tolist()
    app.text_area(key="grid_prompt").set_value("").run()          # bad input: a clear error, no traceback
    assert not app.exception and "empty" in app.error[0].value


def test_retrieval_page(app, monkeypatch):
    _open(app, "retrieval", "Retrieval heads")
    assert "Figure as HTML" in _labels(app) and "Table as CSV" in _labels(app)
    assert len(app.get("plotly_chart")) == 2 + 3 + 1              # scores, GQA; NIAH none/top/random; masking
    assert _run_snippet(_code(app), monkeypatch)["res"].scores.shape == (2, 4)
    assert any("masking top-2" in m.label for m in app.metric)


def test_sinks_page_downloads_a_calibration_file(app):
    _open(app, "sinks", "Sinks and calibration")
    assert "Download the calibration file (calib.json)" in _labels(app)
    app.radio(key="sinks:profile:metric").set_value("sinks").run()
    app.radio(key="sinks:search:metric").set_value("delta_gold_logprob").run()
    assert not app.exception and "delta_gold_logprob" in _code(app)
    app.text_area(key="sinks:tool:compare:prompt").set_value("Review: fine.\nSentiment:")
    app.button(key="sinks:tool:compare").click().run()            # before/after generation on the prompt
    assert not app.exception and {t.label for t in app.text_area} >= {"plain", "calibrated"}


def test_circuits_page(app, monkeypatch):
    _open(app, "circuits", "Circuits")
    assert app.radio(key="circuits:task:task").options == ["induction", "greater_than"]
    app.radio(key="circuits:task:task").set_value("greater_than").run()
    app.radio(key="circuits:task:method").set_value("eap").run()
    assert not app.exception and "res.plot('task', task='greater_than', method='eap')" in _code(app)
    assert [t.task for t in _run_snippet(_code(app), monkeypatch)["res"].tasks] == ["induction", "greater_than"]


def test_similarity_page(app, monkeypatch):
    _open(app, "similarity", "Layer similarity")
    assert _run_snippet(_code(app), monkeypatch)["res"].layer_cos.shape == (2, 2)
    assert len(app.get("plotly_chart")) == 4
    app.radio(key="similarity:layers:metric").set_value("js").run()
    assert not app.exception
    app.text_input(key="similarity:config:n_prompts").set_value("-1").run()     # a bad run option
    assert not app.exception and "n_prompts must be >= 1" in app.error[0].value
    assert not [b for b in app.button if b.key == "similarity:run"]               # no run with a refused option


def test_grounding_page_roc_and_token_view(app):
    _open(app, "grounding", "Grounding")
    assert {"Figure as HTML", "Table as CSV"} <= set(_labels(app))
    assert "res.plot('roc')" in _code(app)
    app.button(key="grounding:tool:guided").click().run()          # guided decoding with the saved detector
    assert not app.exception
    assert "Token view as HTML" in _labels(app)


def test_run_button_writes_a_result_the_page_then_shows(app, tmp_path):
    app.sidebar.text_input(key="results_root").set_value(str(tmp_path)).run()
    switch(app, "similarity").run()
    assert app.selectbox(key="similarity:pick").options == ["shipped: similarity/smollm2-135m"]   # only data/'s run
    app.button(key="similarity:run").click().run(timeout=120)
    assert not app.exception, app.exception
    assert app.selectbox(key="similarity:pick").value == "similarity-tiny-llama"      # the page shows the new run
    assert (tmp_path / "similarity-tiny-llama" / "summary.json").exists()
    assert json.loads((tmp_path / "similarity-tiny-llama" / "summary.json").read_text())["model_id"] == "tiny-llama"
    assert len(app.get("plotly_chart")) == 4


def test_pattern_explorer_page(app):
    app.sidebar.selectbox(key="head").set_value(HeadId(1, 3)).run()   # selected elsewhere: opened here
    _open(app, "pattern_explorer", "Pattern explorer")
    assert app.number_input(key="pe_layer").value == 1 and app.selectbox(key="pe_head").value == 3
    assert any("tokens per cell" in m.value for m in app.markdown)
    app.select_slider(key="pe_size").set_value(16).run()
    app.number_input(key="pe_q0").set_value(3).run()
    assert not app.exception
    assert "queries=(3, 19)" in _code(app)


def test_unknown_model_falls_back_with_error(app):
    app.sidebar.selectbox(key="model_choice").set_value("local folder…").run()
    app.sidebar.text_input(key="model_path").set_value("/no/such/model").run()
    assert not app.exception
    assert app.sidebar.error and "/no/such/model" in app.sidebar.error[0].value


def test_corrupt_saved_result_gives_a_clear_error(app, results, tmp_path):
    import shutil

    bad = tmp_path / "r"
    shutil.copytree(results / "circuits-tiny-llama", bad / "circuits-tiny-llama")
    (bad / "circuits-tiny-llama" / "overlap.parquet").write_bytes(b"not parquet")
    app.sidebar.text_input(key="results_root").set_value(str(bad)).run()
    switch(app, "circuits").run()
    assert not app.exception and "overlap.parquet" in app.error[0].value


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian chromium for kaleido")
def test_png_and_svg_export_offline(tiny_llama):
    from analyses.atlas import head_grid
    from dashboards.common import figure_image

    fig = head_grid(tiny_llama, "abc").plot("entropy")
    assert figure_image(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    svg = figure_image(fig, "svg").decode()
    assert svg.lstrip().startswith("<svg") and "kv1:h3" in svg


def test_run_options_are_checked(tiny_llama, tmp_path):
    from analyses import registry
    from analyses.config import build
    from analyses.retrieval import RetrievalConfig
    from analyses.similarity import SimilarityConfig
    from probe.errors import InputError

    with pytest.raises(InputError, match="unknown option"):
        build(SimilarityConfig, {"n_prompt": 3})
    with pytest.raises(InputError, match="unknown analysis"):
        registry.get("nonsense")
    assert RetrievalConfig.small(tiny_llama).lengths == (tiny_llama.n_ctx - 8 - 40,)
    assert len(RetrievalConfig.small(tiny_llama).depths) == 3          # a grid, not one sample


def test_inputs_survive_navigation_and_a_shared_url_reopens_the_view(app, results, monkeypatch):
    app.sidebar.selectbox(key="head").set_value(HeadId(1, 2)).run()
    app.switch_page("views/token_view.py").run()
    assert app.multiselect(key="tv_heads").value == [HeadId(1, 2)]          # the selected head, by default
    app.text_area(key="tv_text").set_value("abc abc abc").run()
    app.switch_page("views/interventions.py").run()
    app.radio(key="iv_edit").set_value("uniform").run()
    switch(app, "similarity").run()
    app.text_input(key="similarity:config:n_prompts").set_value("3").run()
    app.switch_page("views/token_view.py").run()                             # back: everything as it was left
    assert app.text_area(key="tv_text").value == "abc abc abc" and not app.exception
    assert app.multiselect(key="tv_heads").value == [HeadId(1, 2)]
    app.switch_page("views/interventions.py").run()
    assert app.radio(key="iv_edit").value == "uniform"
    switch(app, "similarity").run()
    assert app.text_input(key="similarity:config:n_prompts").value == "3"
    assert app.sidebar.selectbox(key="head").value == HeadId(1, 2)

    shared = AppTest.from_file(APP, default_timeout=60)                      # a link: ?head=L0H3&tv_text=...
    shared.query_params.update({"head": "L0H3", "tv_text": "xyz xyz", "tv_size": "16"})
    shared.switch_page("views/token_view.py").run()
    assert not shared.exception and [t.value for t in shared.title] == ["Token view"]
    assert shared.sidebar.selectbox(key="head").value == HeadId(0, 3)
    assert shared.text_area(key="tv_text").value == "xyz xyz" and shared.select_slider(key="tv_size").value == 16


def test_small_runs_carry_a_warning_with_n_and_ci(app, results, monkeypatch):
    from analyses import registry

    saved = {s.analysis.name: s.load() for s in registry.find_results(results)}
    for name, title in [("retrieval", "Retrieval heads"), ("circuits", "Circuits"), ("grounding", "Grounding")]:
        _open(app, name, title)
        n, need = saved[name].n_samples(), registry.get(name).min_samples
        assert n < need
        small = [w.value for w in app.warning if w.value.startswith("**Small run")]
        assert len(small) == 1 and f"n = {n}**" in small[0] and f"below the {need}" in small[0], small
        with_ci = [s for s in saved[name].summary().values() if s.ci is not None]
        assert all(s.text() in small[0] for s in with_ci), small[0]           # every interval, with its n
        assert "n = None" not in small[0], small[0]                           # ... where it has one
    import dataclasses

    big = dataclasses.replace(registry.get("circuits"), min_samples=saved["circuits"].n_samples())
    monkeypatch.setattr(registry, "get", lambda name, _get=registry.get: big if name == "circuits" else _get(name))
    _open(app, "circuits", "Circuits")                                       # at its minimum size: no warning
    assert not [w for w in app.warning if w.value.startswith("**Small run")]


def test_top_heads_and_the_head_card_follow_the_selected_head(app):
    app.sidebar.selectbox(key="head").set_value(HeadId(0, 3)).run()
    app.switch_page("views/top_heads.py").run()
    assert not app.exception and [t.value for t in app.title] == ["Top heads"]
    ranked = app.dataframe[0].value
    assert {"retrieval", "circuits", "grounding"} <= set(ranked["analysis"]) and (ranked["rank"] <= 20).all()
    assert app.subheader[0].value.startswith("L0H3: ")
    mine = app.dataframe[-1].value
    assert len(mine) and set(mine["source"]) <= set(ranked["source"])
    app.switch_page("views/head_card.py").run()
    assert not app.exception and app.subheader[0].value.startswith("L0H3 · KV group 1")
    assert any("cross-analysis study's card, from `atlas-tiny-llama`" in c.value for c in app.caption)
    card = app.dataframe[0].value                                   # the study's card: every score ranked
    assert any(m.startswith("retrieval: ") for m in card["metric"]) and card["percentile"].dropna().between(0, 100).all()
    assert {"rank", "n", "source"} <= set(card.columns)
    assert "saved_card('L0H3'" in _code(app)
    app.button(key="card_next").click().run()                       # the next head: L1H0 (wraps to the next layer)
    assert app.sidebar.selectbox(key="head").value == HeadId(1, 0)
    assert app.subheader[0].value.startswith("L1H0 · KV group 0")


def test_head_card_falls_back_without_a_saved_study(app, results, tmp_path):
    import shutil

    for folder in results.iterdir():                                # every result but the cross-analysis study
        if folder.is_dir() and not folder.name.startswith("atlas"):
            shutil.copytree(folder, tmp_path / folder.name)
    app.sidebar.text_input(key="results_root").set_value(str(tmp_path)).run()
    app.switch_page("views/head_card.py").run()
    assert not app.exception and not app.error
    assert any("No saved cross-analysis study" in c.value for c in app.caption)
    card = app.dataframe[0].value
    assert "retrieval_score" in set(card["metric"]) and card["percentile"].between(0, 100).all()


def _live_page():
    """A page running one forward through ``dashboards.progress.live`` (what the explorer's runs use)."""
    import streamlit as st

    from dashboards import memo
    from dashboards.progress import live
    from probe import load_model

    model = load_model("tiny-llama")

    def compute():
        st.session_state["forwards"] = st.session_state.get("forwards", 0) + 1
        model.hf(model.encode("the cat sat on the mat"), use_cache=False)
        return "computed"

    key = ("live-test", st.session_state.get("text", "a"))
    st.write(live(memo.table("live-test", 4), key, "One forward", "lt", model, compute, calls=model.n_layers))


def test_live_runs_show_progress_per_layer_and_a_cancel_holds_the_run(monkeypatch):
    from dashboards import memo
    from dashboards.progress import LiveProgress

    memo.table("live-test", 4).items.clear()
    ticks = []
    monkeypatch.setattr(LiveProgress, "update", lambda self, d, t, what="": ticks.append((d, t)))
    at = AppTest.from_function(_live_page, default_timeout=60)
    at.session_state["lt:cancelled"] = True                       # as the Cancel button's callback leaves it
    at.run()
    assert not at.exception and "forwards" not in at.session_state       # held: the rerun did not restart it
    assert any("cancelled" in i.value for i in at.info) and not ticks
    at.button(key="lt:again").click().run()                          # "Run it": computed, a tick per layer
    assert not at.exception and at.markdown[-1].value == "computed" and at.session_state["forwards"] == 1
    n = len(ticks)
    assert n >= 2 and ticks == [(i + 1, n) for i in range(n)]
    at.run()                                                         # memoised: no second forward, no bar
    assert at.session_state["forwards"] == 1 and len(ticks) == n
