"""End to end in a real browser: serve the dashboard, visit every page in headless Debian chromium
(driven by Playwright; never `playwright install`), check the key elements, save screenshots.

Analysis pages open the tiny-llama results of the ``results`` fixture; the head atlas is also
opened on the embedded model (the picture of the README). The workbench test clicks a head on the
atlas and follows it through every page, hovers a token, runs an intervention and reopens a shared
link, while every request the pages make is recorded: any that leaves localhost fails the test."""
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect

from browser import CHROMIUM, ROOT, chromium, click_cell, idle, record_requests, serve, wait_for_page

LONG = 300_000                         # ms: the machine is shared; a rerun may take a while
SHOTS = ROOT / "out" / "screenshots"
# url path, title, plotly charts drawn, text that must appear
PAGES = [("", "Head atlas", 2, "Sources: 6 saved result(s)"),
         ("top_heads", "Top heads", 0, "rank 1 = the highest value"),
         ("head_card", "Head card", 1, "Roles"),
         ("token_view", "Token view", 0, "exact attention among the window"),
         ("interventions", "Interventions", 0, "Pick heads"),
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
    wait_for_page(page, title, charts, timeout_ms=LONG)
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


def _head(page):
    """The sidebar's selected-head box (its value is the selected head)."""
    return page.get_by_role("combobox", name="Selected head (every page)")


def _main(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def _goto(page, title: str) -> str:
    """Click ``title`` in the sidebar; the page's text once its script has finished."""
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title).wait_for(timeout=LONG)
    idle(page)
    return _main(page)


FOLLOW = {"Top heads": "now L1H2", "Head card": "L1H2 · KV group 1", "Token view": "L1H2",
          "Pattern explorer": "L1H2: block-", "Interventions": "L1H2"} | \
    {title: "Selected head L1H2" for title in ("Retrieval heads", "Sinks and calibration", "Circuits", "Layer similarity",
                                             "Grounding", "Cross-analysis study")}    # every analysis page


def test_workbench_follows_a_clicked_head_offline(results):
    with serve("tiny-llama", results=results) as url, chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 1600})
        outside = record_requests(context, url)
        page = context.new_page()
        page.goto(url)
        wait_for_page(page, "Head atlas", 2, timeout_ms=LONG)
        expect(_head(page)).to_have_value("L0H0")
        click_cell(page, 0, 2, 1)                                    # the atlas grid: column kv1:h2, layer 1
        expect(_head(page)).to_have_value("L1H2", timeout=LONG)
        expect(page.locator('[data-testid="stMain"]')).to_contain_text("L1H2 (KV group 1)", timeout=LONG)
        assert parse_qs(urlparse(page.url).query)["head"] == ["L1H2"]      # the selection lives in the URL
        for title, text in FOLLOW.items():                           # every page follows the selection
            _goto(page, title)
            expect(page.locator('[data-testid="stMain"]')).to_contain_text(text, timeout=LONG)
            assert "head=L1H2" in page.url, title
            assert page.locator('[data-testid="stException"]').count() == 0, title

        _goto(page, "Token view")                                    # hover a token: its row is coloured
        frame = page.frame_locator("iframe").first
        frame.locator(".hw-tok").nth(12).wait_for(timeout=LONG)
        frame.locator(".hw-tok").nth(12).hover()
        top = frame.locator(".hw-top").first.inner_text()
        assert re.search(r"12:.* attends to: .*\d\.\d{3}", top), top
        shaded = frame.locator(".hw-tok").evaluate_all(
            "ts => ts.filter(t => t.style.background && t.style.background !== 'transparent').length")
        assert shaded == 13                                          # the token and the 12 before it (causal)
        page.locator("textarea").first.fill("the cat sat on the mat and the cat sat")
        page.locator("textarea").first.press("Control+Enter")
        idle(page)
        expect(page.locator('[data-testid="stMain"]')).to_contain_text("38 tokens · window 0..37", timeout=LONG)
        shared = page.url
        assert "tv_text=" in shared and "head=L1H2" in shared

        other = context.new_page()                                   # a shared link reopens the same view
        other.goto(shared)
        other.get_by_role("heading", name="Token view").wait_for(timeout=LONG)
        idle(other)
        expect(other.locator("textarea").first).to_have_value("the cat sat on the mat and the cat sat", timeout=LONG)
        expect(_head(other)).to_have_value("L1H2", timeout=LONG)
        expect(other.locator('[data-testid="stMain"]')).to_contain_text("38 tokens · window 0..37", timeout=LONG)
        other.close()

        _goto(page, "Interventions")                                 # zero-ablate L1H2: the logits move
        page.get_by_role("button", name="Run the intervention").click()
        page.get_by_text("KL(plain").wait_for(timeout=LONG)
        idle(page)
        metrics = page.locator('[data-testid="stMetric"]').all_inner_texts()
        kl = float(re.search(r"KL\(plain ‖ edited\)\s+([0-9.e+-]+) nats", "\n".join(metrics)).group(1))
        dlogit = float(re.search(r"logit ([+-][0-9.]+)\)", "\n".join(metrics)).group(1))
        assert kl > 0 and dlogit != 0, metrics
        page.screenshot(path=str(SHOTS / "interventions.png"), full_page=True)

        _goto(page, "Pattern explorer")                              # a click on the overview centres the zoom
        before = page.get_by_label("Query window start").input_value()
        click_cell(page, 0, 8.0, 8.0)
        expect(page.get_by_label("Query window start")).not_to_have_value(before, timeout=LONG)

        _goto(page, "Head atlas")                                    # the sidebar toggle: a click opens the card
        page.locator('[data-testid="stSidebar"]').get_by_text("A click on a head opens its card").click()
        idle(page)
        click_cell(page, 0, 3, 0)                                    # column kv1:h3, layer 0
        page.get_by_role("heading", name="Head card").wait_for(timeout=LONG)
        expect(page.locator('[data-testid="stMain"]')).to_contain_text("L0H3 · KV group 1", timeout=LONG)
        expect(page.locator('[data-testid="stMain"]')).to_contain_text("cross-analysis study's card", timeout=LONG)
        expect(page).to_have_url(re.compile(r"/head_card\?(.+&)?head=L0H3(&|$)"), timeout=LONG)   # the card's URL
        card = context.new_page()                                    # ... reopens the card on that head
        card.goto(page.url)
        card.get_by_role("heading", name="Head card").wait_for(timeout=LONG)
        idle(card)
        expect(_head(card)).to_have_value("L0H3", timeout=LONG)
        expect(card.locator('[data-testid="stMain"]')).to_contain_text("L0H3 · KV group 1", timeout=LONG)
        context.close()
    assert not outside, f"requests that left localhost: {sorted(set(outside))}"


def _timings(out: dict, path: str = "") -> dict[str, object]:
    """Every timing leaf of the bench's JSON by its path (lists and dicts walked; ``a.b[0]``)."""
    if isinstance(out, dict):
        return {k: v for key, val in out.items() for k, v in _timings(val, f"{path}.{key}".lstrip(".")).items()}
    if isinstance(out, list):
        return {k: v for i, val in enumerate(out) for k, v in _timings(val, f"{path}[{i}]").items()}
    return {path: out}


def test_dashboard_bench_quick(results):
    """bench/dashboard.py --quick as a smoke test: every timing it promises is measured, as a positive number
    (a page that was not drawn reports a sentence instead, and fails here); no timing is asserted."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dashboard.py"), "--quick", "--root", str(results)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "tiny-llama" and out["quick"] is True
    assert set(out["page_open_first_s"]) == set(out["page_switch_s"]) == {"Head atlas", "Layer similarity"}
    assert set(out["window_move_s"]) == {"first_open_s", "move_inside_band_s", "head_change_same_layer_s"}
    assert len(out["window_move_s"]["move_inside_band_s"]) == 1
    assert set(out["interaction_s"]) == {"Layer similarity"}
    about = {"model", "quick", "cpus", "torch_threads", "load_avg_1m_start", "load_avg_1m_end"}
    timings = {k: v for k, v in _timings(out).items() if k not in about}
    assert len(timings) == 10, sorted(timings)              # server, 2 opens, 2 switches, 3 explorer, 2 clicks
    bad = {k: v for k, v in timings.items() if not (isinstance(v, float) and v > 0)}
    assert not bad, bad
