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
            proc.wait(10)
        except subprocess.TimeoutExpired:                           # a loaded machine: don't mask the real failure
            proc.kill()
            proc.wait()


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
