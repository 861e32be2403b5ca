"""Screenshots of every dashboard page on the embedded model, for docs/ (regenerate after a UI change).

Serves the dashboard with ``tests/browser.py``'s harness (headless Debian chromium), opens each page
with the saved results under ``--root`` (plus the runs shipped in data/), waits until its charts are
drawn and saves ``docs/dashboard_<page>.png`` (the viewport, not the whole scroll: what a user sees
first). Pages without a saved result are skipped (and say so); ``bench/dashboard.py --root DIR``
writes the small run of every analysis first.

Run: PYTHONPATH=$PWD python scripts/screenshots.py --root results/bench [--out docs] [--only token_view,...]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import chromium, idle, serve, wait_for_page  # noqa: E402

# url path (with the view's query), title, plotly charts to wait for, what to do before the shot
PAGES = [("?head=L18H6", "Head atlas", 2, "grid"),
         ("top_heads?head=L18H6", "Top heads", 0, None),
         ("head_card?head=L18H6", "Head card", 1, None),
         ("token_view?head=L18H6&tv_heads=L18H6&tv_heads=L3H0&tv_text=When+Mary+and+John+went+to+the+store%2C+"
          "John+gave+a+drink+to+Mary.+Then+John+went+home.", "Token view", 0, "hover"),
         ("pattern_explorer?head=L18H6", "Pattern explorer", 2, None),
         ("interventions?head=L18H6", "Interventions", 0, "intervene"),
         ("retrieval", "Retrieval heads", 2, None),
         ("sinks", "Sinks and calibration", 1, None),
         ("circuits", "Circuits", 1, None),
         ("similarity", "Layer similarity", 1, None),
         ("grounding", "Grounding", 1, None),
         ("atlas", "Cross-analysis study", 1, None)]


def before(page, action) -> None:
    if action == "grid":                        # the grid itself, under the prompt and the sources
        page.locator(".js-plotly-plot").first.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.wait_for_timeout(500)
    elif action == "hover":                       # a token hovered: what it attends to is coloured
        frame = page.frame_locator("iframe").first
        frame.locator(".hw-tok").nth(20).wait_for(timeout=120_000)
        frame.locator(".hw-tok").nth(20).hover()
        page.wait_for_timeout(500)
    elif action == "intervene":
        page.get_by_role("button", name="Run the intervention").click()
        page.get_by_text("KL(plain").wait_for(timeout=300_000)
        idle(page)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .svg-container').length >= 1")
        page.wait_for_timeout(500)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="results/bench", help="results folder the pages open")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", default="", help="comma-separated url paths (default: every page)")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with serve(a.model, results=a.root, timeout=60) as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for path, title, charts, action in PAGES:
            name = path.split("?")[0] or "head_atlas"
            if only and name not in only:
                continue
            page.goto(f"{url}/{path}")
            page.get_by_role("heading", name=title).wait_for(timeout=300_000)
            idle(page)
            if "No saved" in page.locator('[data-testid="stMain"]').inner_text():
                print(f"{name}: no saved result under {a.root}; skipped (run bench/dashboard.py --root first)")
                continue
            wait_for_page(page, title, charts, timeout_ms=300_000)
            before(page, action)
            shot = out / f"dashboard_{name}.png"
            page.screenshot(path=str(shot))
            print(f"wrote {shot}", flush=True)


if __name__ == "__main__":
    main()
