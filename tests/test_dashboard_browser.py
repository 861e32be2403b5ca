"""End to end in a real browser: serve the dashboard, visit every page in headless Debian chromium
(driven by Playwright; never `playwright install`), check the key elements, save screenshots.

Analysis pages open the tiny-llama results of the ``results`` fixture; the head atlas is also
opened on the embedded model (the picture of the README)."""
from pathlib import Path

import pytest

from browser import CHROMIUM, ROOT, chromium, serve, wait_for_page

SHOTS = ROOT / "out" / "screenshots"
# url path, title, plotly charts drawn, text that must appear
PAGES = [("", "Head atlas", 2, "Saved scores from 6 result(s)"),
         ("pattern_explorer", "Pattern explorer", 2, "tokens per cell"),
         ("retrieval", "Retrieval heads", 6, "NIAH success over context length"),
         ("sinks", "Sinks and calibration", 3, "Download the calibration file"),
         ("circuits", "Circuits", 2, "Per-task head maps"),
         ("similarity", "Layer similarity", 1, "plan: layers shared"),
         ("grounding", "Grounding", 1, "held-out AUROC"),
         ("atlas", "Cross-analysis study", 4, "Causal transfer")]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (scripts/setup.sh --browser)")]


def _check(page, title, charts, text, shot):
    wait_for_page(page, title, charts)
    page.locator('[data-testid="stMain"]').get_by_text(text).first.wait_for(timeout=30_000)
    assert page.locator('[data-testid="stException"]').count() == 0, title
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0, title
    page.screenshot(path=str(SHOTS / shot), full_page=True)


def test_every_page_renders_in_chromium(results):  # noqa: F811
    SHOTS.mkdir(parents=True, exist_ok=True)
    with serve("tiny-llama", results=results) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        for path, title, charts, text in PAGES:
            page.goto(f"{url}/{path}")
            _check(page, title, charts, text, f"{path or 'head_atlas'}.png")
        page.get_by_role("link", name="Head atlas").click()             # back through the navigation
        wait_for_page(page, "Head atlas", 2)
        assert "kv1:h3" in page.locator(".js-plotly-plot").first.inner_text()


def test_head_atlas_on_the_embedded_model(tmp_path):
    with serve("smollm2-135m", results=tmp_path) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        _check(page, "Head atlas", 2, "L0H0 (KV group 0)", "head_atlas_smollm2.png")
        assert "smollm2-135m · 30 layers · 9 heads · 3 KV heads" in page.locator('[data-testid="stSidebar"]').inner_text()
        assert "kv2:h8" in page.locator(".js-plotly-plot").first.inner_text()
