"""Serve the dashboard in a subprocess and drive it with headless Debian chromium (tests, benches, screenshots).

Playwright drives the system chromium (``/usr/bin/chromium``); never ``playwright install``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent   # the checkout (this file lives in tests/)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model: str, port: int | None = None, timeout: float = 30.0, results: str | Path | None = None):
    """Run ``streamlit run dashboards/app.py`` on localhost with ``model`` (and a results folder); yield its URL."""
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEADWISE_DASHBOARD_MODEL": model}
    if results is not None:
        env["HEADWISE_RESULTS"] = str(results)
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "app.py"), "--server.port", str(port),
           "--server.address", "localhost", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the dashboard did not come up on {url} within {timeout:.0f} s") from None
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:     # a script run still busy: do not leave the server behind
            proc.kill()
            proc.wait(5)


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for_page(page, title: str, charts: int, timeout_ms: int = 90_000) -> None:
    """Wait until the page's title, ``charts`` plotly charts are drawn and the script has finished."""
    page.get_by_role("heading", name=title).wait_for(timeout=timeout_ms)
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .svg-container').length >= {charts}",
                           timeout=timeout_ms)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    page.wait_for_timeout(300)                                      # let plotly finish painting


def idle(page, timeout_ms: int = 300_000) -> None:
    """Wait until the script run the last interaction started has finished."""
    page.wait_for_timeout(400)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def cell_position(page, chart: int, column: int, row: int) -> tuple[float, float]:
    """Page coordinates of cell (``column``, ``row``) of the ``chart``-th plotly chart (category or index axes)."""
    return tuple(page.evaluate("""([i, c, r]) => {
        const gd = document.querySelectorAll('.js-plotly-plot')[i], fl = gd._fullLayout, b = gd.getBoundingClientRect();
        return [b.left + fl.xaxis._offset + fl.xaxis.c2p(c), b.top + fl.yaxis._offset + fl.yaxis.c2p(r)];
    }""", [chart, column, row]))


def click_cell(page, chart: int, column: int, row: int) -> None:
    page.locator(".js-plotly-plot").nth(chart).scroll_into_view_if_needed()
    page.mouse.click(*cell_position(page, chart, column, row))
    idle(page)


def record_requests(context, origin: str) -> list[str]:
    """Every request the pages of ``context`` make (frames and workers included); any not to ``origin``
    is recorded and refused, so a test can fail on it without anything leaving the machine."""
    outside: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(origin) or url.startswith(("data:", "blob:", "about:")):
            return r.continue_()
        outside.append(url)
        return r.abort()

    context.route("**/*", route)
    return outside
