"""Benchmark: similarity accumulation per prompt vs a plain forward of the same prompt; prints JSON.

For each length T, in one process and interleaved (plain, ours, plain, ours, ...), medians of
``--repeats``: (a) the plain forward ``hf(ids, use_cache=False, logits_to_keep=1)`` on the model's
own (SDPA) attention; (b) :func:`analyses.similarity.accumulate_prompt` (one forward keeping the
post-rotary queries and keys, then block-wise patterns and products; window 128, head JS between
adjacent layers, as the analysis runs). ``ratio = ours / plain`` is the figure the README states.
A per-phase split of one run of (b) shows where the time goes (forward, patterns, products).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/similarity.py                 # T = 512, 2048 (embedded model)
    PYTHONPATH=$PWD python bench/similarity.py --quick                           # tiny model, T = 64: a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def prompt_ids(model, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` random token ids (seeded; the cost does not depend on the text)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.hf.config.vocab_size, (1, n_tokens), generator=g).to(model.device)


def plain(model, ids) -> None:
    with torch.no_grad():
        model.hf(ids, use_cache=False, logits_to_keep=1)


def ours(model, ids, window: int, head_js: str) -> None:
    from analyses.similarity import Accumulator, accumulate_prompt

    accumulate_prompt(model, ids, Accumulator(model.n_layers, model.n_heads, head_js), window)


def phases(model, ids, window: int, head_js: str) -> dict:
    """Seconds spent in the forward, in rebuilding the patterns and in the products (one run)."""
    import analyses.similarity.measure as M

    spent = {"patterns_s": 0.0, "products_s": 0.0}
    block, add = M.pattern_block, M.Accumulator.add_window

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    M.pattern_block, M.Accumulator.add_window = timed(block, "patterns_s"), timed(add, "products_s")
    try:
        t0 = time.perf_counter()
        ours(model, ids, window, head_js)
        total = time.perf_counter() - t0
    finally:
        M.pattern_block, M.Accumulator.add_window = block, add
    return {k: round(v, 3) for k, v in spent.items()} | {
        "forward_s": round(total - spent["patterns_s"] - spent["products_s"], 3), "total_s": round(total, 3)}


def measure(model, n_tokens: int, repeats: int, window: int, head_js: str) -> dict:
    ids = prompt_ids(model, n_tokens)
    plain(model, ids)
    ours(model, ids, window, head_js)  # warm-up of both
    times = {"plain": [], "ours": []}
    for _ in range(repeats):
        for name, fn in (("plain", lambda: plain(model, ids)), ("ours", lambda: ours(model, ids, window, head_js))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": n_tokens, "plain_s": round(med["plain"], 3), "ours_s": round(med["ours"], 3),
            "ratio": round(med["ours"] / med["plain"], 2), "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "phases": phases(model, ids, window, head_js)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--head-js", default="adjacent", choices=("adjacent", "all", "none"))
    ap.add_argument("--quick", action="store_true", help="tiny model, T = 64, one repeat (a smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.lengths, a.repeats = "tiny-llama", "64", 1
    from probe import install, load_model

    model = load_model(a.model)
    install(model.hf)
    rows = [measure(model, int(n), a.repeats, a.window, a.head_js) for n in a.lengths.split(",")]
    print(json.dumps({"bench": "similarity", "model": model.model_id, "threads": torch.get_num_threads(),
                      "window": a.window, "head_js": a.head_js, "repeats": a.repeats, "target_ratio": 3.0,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
