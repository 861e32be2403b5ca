"""AppTest smoke tests: every dashboard page renders on tiny-llama with no exception."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboards" / "app.py")


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("HEADWISE_DASHBOARD_MODEL", "tiny-llama")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_head_grid_page(app):
    assert [t.value for t in app.title] == ["Head grid"]
    assert not app.error
    assert app.sidebar.selectbox(key="model_choice").value == "tiny-llama"
    assert app.radio(key="grid_metric").options == ["mean entropy (nats)", "mean max attention",
                                                    "mean attention on the first token"]
    heads = app.selectbox(key="grid_head")
    assert heads.options[:4] == ["L0H0", "L0H1", "L0H2", "L0H3"] and len(heads.options) == 8
    heads.set_value("L1H2").run()                                  # select a head: its pattern is drawn
    assert not app.exception and "L1H2" in app.get("code")[0].value
    app.radio(key="grid_metric").set_value("mass:first").run()
    assert not app.exception
    app.text_area(key="grid_prompt").set_value("").run()           # bad input: a clear error, no traceback
    assert not app.exception and "empty" in app.error[0].value


def test_pattern_explorer_page(app):
    app.switch_page("views/pattern_explorer.py").run()
    assert not app.exception, app.exception
    assert [t.value for t in app.title] == ["Pattern explorer"] and not app.error
    assert any("tokens per cell" in m.value for m in app.markdown)
    app.select_slider(key="pe_size").set_value(16).run()
    app.number_input(key="pe_q0").set_value(3).run()
    assert not app.exception
    assert "queries=(3, 19)" in app.get("code")[0].value


def test_unknown_model_falls_back_with_error(app):
    app.sidebar.selectbox(key="model_choice").set_value("local folder…").run()
    app.sidebar.text_input(key="model_path").set_value("/no/such/model").run()
    assert not app.exception
    assert app.sidebar.error and "/no/such/model" in app.sidebar.error[0].value


def test_every_figure_and_table_has_a_download(app):
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels.count("Figure as HTML") == 2 and "Table as CSV" in labels


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian chromium for kaleido")
def test_png_and_svg_export_offline(tiny_llama):
    from analyses.atlas import head_grid
    from dashboards.common import figure_image

    fig = head_grid(tiny_llama, "abc").plot("entropy")
    assert figure_image(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    svg = figure_image(fig, "svg").decode()
    assert svg.lstrip().startswith("<svg") and "kv1:h3" in svg
