"""End to end in a real browser: serve the dashboard on the embedded model, visit every page in
headless Debian chromium (driven by Playwright; never `playwright install`), save screenshots."""
from pathlib import Path

import pytest

from dashboards.browser import CHROMIUM, ROOT, chromium, serve, wait_for_page

SHOTS = ROOT / "out" / "screenshots"
PAGES = [("", "Head grid", 2), ("pattern_explorer", "Pattern explorer", 2)]  # url path, title, heat maps

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (scripts/setup.sh --browser)")]


def test_every_page_renders_in_chromium():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with serve("smollm2-135m") as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        for path, title, charts in PAGES:
            page.goto(f"{url}/{path}")
            wait_for_page(page, title, charts)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            page.screenshot(path=str(SHOTS / f"{title.lower().replace(' ', '_')}.png"))
        assert "smollm2-135m · 30 layers · 9 heads · 3 KV heads" in page.locator('[data-testid="stSidebar"]').inner_text()
        page.get_by_role("link", name="Head grid").click()              # back through the navigation
        wait_for_page(page, "Head grid", 2)
        assert "kv2:h8" in page.locator(".js-plotly-plot").first.inner_text()
