"""Dashboard timings on the embedded model; prints JSON.

first_run: each analysis' small scan (``config.small(model)``, what a page's Run button does),
  from scratch on the embedded model, written under ``--root`` (skipped with ``--no-runs``): wall time,
  process CPU time (user+sys over both threads: on two idle cores wall ~ cpu/2) and the load average,
  because the machine is shared.
page_open_*_s: headless chromium, a fresh tab per page (the whole frontend loads again), until its
  charts are drawn, with the results under ``--root`` saved (first open on a fresh server, then again).
page_switch_s: one tab, clicking each page in the sidebar (how a user moves; second round of clicks).
window_move_s: the pattern explorer's zoom window: the first window (its row band computed), then moves
  inside the band (cached rows: no model run) and a head change in the same layer (same rows).
intervention_s: the interventions page's Run (zero-ablate the selected head; plain vs edited next-token
  distributions and 20 generated tokens each), click to the KL metric.
interaction_s: on each analysis page below, the step a user waits on, click to the page drawn again:
  circuits (the per-task head map switched to another task), similarity (the layer matrices switched from
  cosine to Jensen-Shannon), the cross-analysis study (its "Open the head card" tool: one forward).
Run: PYTHONPATH=$PWD python bench/dashboard.py --root results/bench [--no-runs | --no-pages] [--only sinks,circuits]
  [--threads N] (torch threads of the first runs; the server keeps its own)
--quick: a smoke run on tiny-llama (no scans; the atlas and one analysis page opened, one switch each way,
  one window move, the intervention and one analysis interaction), with the results under --root; the
  suite runs it, no timing asserted.
"""
import argparse
import json
import os
import shutil
import time

import torch

from analyses import registry, run
from tests.browser import chromium, idle, serve, wait_for_page

MODEL = "smollm2-135m"
QUICK_MODEL = "tiny-llama"
PAGES = [("", "Head atlas", 2), ("top_heads", "Top heads", 0), ("head_card", "Head card", 1),
         ("token_view", "Token view", 0), ("interventions", "Interventions", 0),
         ("pattern_explorer", "Pattern explorer", 2), ("retrieval", "Retrieval heads", 6),
         ("sinks", "Sinks and calibration", 3), ("circuits", "Circuits", 2), ("similarity", "Layer similarity", 1),
         ("grounding", "Grounding", 1), ("atlas", "Cross-analysis study", 4)]
QUICK_PAGES = [PAGES[0], PAGES[9]]                     # the head atlas and layer similarity


def _choose(page, group: str, option: str) -> None:
    """Click ``option`` of the last radio group labelled ``group``."""
    page.get_by_role("radiogroup", name=group).last.get_by_text(option, exact=True).click()


def _open_card(page) -> None:
    page.get_by_role("button", name="Open the head card").click()


# page title -> (url path, the interaction a user waits on, what shows when it is done)
INTERACTIONS = {"Circuits": ("circuits", lambda p: _choose(p, "task", "induction"), None),
                "Layer similarity": ("similarity", lambda p: _choose(p, "metric", "js"), None),
                "Cross-analysis study": ("atlas", _open_card, "card")}


def first_runs(root, only, threads: int | None = None) -> dict:
    from probe import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(MODEL)
    out = {}
    for kind in only:
        folder = os.path.join(root, f"{kind}-{model.model_id}")
        shutil.rmtree(folder, ignore_errors=True)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            analysis = registry.get(kind)
            cfg = analysis.config.small(model)
            run(analysis, model, cfg, store=folder)
            err = None
        except Exception as exc:  # report and go on: one failing default must not hide the others
            err = f"{type(exc).__name__}: {exc}"
        out[kind] = {"config": cfg.to_dict() if err is None else None,
                     "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - cpu, 1),
                     "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
                     "error": err}
        print(json.dumps({kind: out[kind]}), flush=True)
    return out


def timed_open(browser, url, path, title, charts) -> float | str:
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    t = time.perf_counter()
    page.goto(f"{url}/{path}")
    try:
        wait_for_page(page, title, charts, timeout_ms=60_000)
    except Exception:  # noqa: BLE001  (e.g. no saved result for this page under --root)
        page.close()
        return "not drawn within 60 s (no saved result?)"
    dt = time.perf_counter() - t
    assert page.locator('[data-testid="stException"]').count() == 0, title
    page.close()
    return round(dt, 2)


def switch_times(browser, url, pages=PAGES, rounds: int = 2) -> dict:
    """One tab, the way a user moves: click each page in the sidebar; until its charts are drawn."""
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    page.goto(url)
    wait_for_page(page, "Head atlas", 2)
    out = {}
    for _ in range(rounds):                            # the second round: every result already opened
        for path, title, charts in pages[1:] + pages[:1]:
            t = time.perf_counter()
            page.get_by_role("link", name=title).click()
            try:
                wait_for_page(page, title, charts, timeout_ms=60_000)
                out[title] = round(time.perf_counter() - t, 2)
            except Exception:  # noqa: BLE001
                out[title] = "not drawn within 60 s"
    page.close()
    return out


def _settled(page, t: float) -> float:
    idle(page, 120_000)
    return round(time.perf_counter() - t, 2)


def window_moves(browser, url, layer: int = 3, steps=(8, 16, 24)) -> dict:
    """The explorer on the default long text: first window, moves inside the cached band, a head change."""
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    t = time.perf_counter()
    page.goto(f"{url}/pattern_explorer?head=L{layer}H0")
    wait_for_page(page, "Pattern explorer", 2, timeout_ms=300_000)
    out = {"first_open_s": round(time.perf_counter() - t, 2)}
    box = page.get_by_label("Query window start")
    start = int(box.input_value())
    moves = []
    for step in steps:                                  # stays inside the 64-row band of the first window
        box.fill(str(max(0, start - step)))
        t = time.perf_counter()
        box.press("Enter")
        moves.append(_settled(page, t))
    out["move_inside_band_s"] = moves
    t = time.perf_counter()
    page.get_by_role("combobox", name="Selected head (every page)").fill(f"L{layer}H1")
    page.keyboard.press("Enter")
    out["head_change_same_layer_s"] = _settled(page, t)
    page.close()
    return out


def intervention_time(browser, url, layer: int = 3) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    page.goto(f"{url}/interventions?head=L{layer}H0")
    page.get_by_role("heading", name="Interventions").wait_for(timeout=300_000)
    idle(page, 300_000)
    t = time.perf_counter()
    page.get_by_role("button", name="Run the intervention").click()
    page.get_by_text("KL(plain").wait_for(timeout=300_000)
    dt = _settled(page, t)
    page.close()
    return dt


def interaction_times(browser, url, titles) -> dict:
    """Each page's interaction (``INTERACTIONS``): from the click until the page's script has finished."""
    out = {}
    for title in titles:
        path, act, shows = INTERACTIONS[title]
        charts = dict((t, c) for _, t, c in PAGES)[title]
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto(f"{url}/{path}")
        try:
            wait_for_page(page, title, charts, timeout_ms=120_000)
        except Exception:  # noqa: BLE001  (no saved result for this page under --root)
            out[title] = "not drawn within 120 s (no saved result?)"
            page.close()
            continue
        t = time.perf_counter()
        try:
            act(page)
            if shows is not None:
                page.get_by_label(shows, exact=True).wait_for(timeout=300_000)
            out[title] = _settled(page, t)
        except Exception as exc:  # noqa: BLE001  (reported, not raised: the other timings still print)
            out[title] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        if page.locator('[data-testid="stException"]').count():
            out[title] = "the page raised an exception"
        page.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="results/bench")
    ap.add_argument("--no-runs", action="store_true")
    ap.add_argument("--only", default=",".join(registry.names()))
    ap.add_argument("--no-pages", action="store_true", help="only the first runs (no browser)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the first runs")
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny-llama (see the module docstring)")
    a = ap.parse_args(argv)
    model, pages, layer = (QUICK_MODEL, QUICK_PAGES, 1) if a.quick else (MODEL, PAGES, 3)
    out = {"model": model, "quick": a.quick, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    if not (a.no_runs or a.quick):
        out["first_run"] = first_runs(a.root, a.only.split(","), a.threads)
    if a.no_pages:
        print(json.dumps(out))
        return
    t = time.perf_counter()
    with serve(model, results=a.root) as url, chromium() as browser:
        out["server_up_s"] = round(time.perf_counter() - t, 2)
        out["page_open_first_s"] = {title: timed_open(browser, url, p, title, c) for p, title, c in pages}
        if not a.quick:
            out["page_open_again_s"] = {title: timed_open(browser, url, p, title, c) for p, title, c in pages}
        out["page_switch_s"] = switch_times(browser, url, pages, 1 if a.quick else 2)
        out["window_move_s"] = window_moves(browser, url, layer, (8,) if a.quick else (8, 16, 24))
        out["intervention_s"] = intervention_time(browser, url, layer)
        out["interaction_s"] = interaction_times(browser, url, ["Layer similarity"] if a.quick else list(INTERACTIONS))
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
