"""Dashboard timings in headless chromium on the embedded model; prints JSON.

first_head_grid_s: fresh server, open the head grid (model load + stream stats + capture + drawing).
cached_open_s: open each page again in a new tab (results come from st.cache_data).
Run: PYTHONPATH=$PWD python bench/dashboard.py
"""
import json
import os
import time

from dashboards.browser import chromium, serve, wait_for_page

PAGES = [("", "Head grid"), ("pattern_explorer", "Pattern explorer")]


def timed_open(browser, url, path, title) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    t = time.perf_counter()
    page.goto(f"{url}/{path}")
    wait_for_page(page, title, 2)
    dt = time.perf_counter() - t
    page.close()
    return round(dt, 2)


def main() -> None:
    out = {"model": "smollm2-135m", "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    t = time.perf_counter()
    with serve("smollm2-135m") as url, chromium() as browser:
        out["server_up_s"] = round(time.perf_counter() - t, 2)
        out["first_head_grid_s"] = timed_open(browser, url, *PAGES[0])
        out["first_pattern_explorer_s"] = timed_open(browser, url, *PAGES[1])
        out["cached_open_s"] = {title: timed_open(browser, url, path, title) for path, title in PAGES}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
