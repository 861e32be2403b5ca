"""Interventions vs the plain forward, in one process, interleaved, medians (issue 20 item 3).

For each prompt length: a plain forward (the model's SDPA), then the same forward under ACT on
110 heads (detected sinks, the calibration at inference), zero-ablation, Uniform and Temperature
on the same 110 heads, and ACT through the previous engine path (eager separate accumulators) for a
before/after in the same run. Rounds interleave every condition; each figure is the median of
``--repeats`` rounds and its ratio to the plain median, for the wall time and for the process CPU
time (with one thread on a shared machine, the steadier figure). Prints one JSON object.

    python bench/interventions.py                 # 2,048 tokens, medians of 3
    python bench/interventions.py --lengths 2048,8192
    python bench/interventions.py --quick         # 128 tokens, one round: a smoke run (the suite runs it)
    python bench/interventions.py --conditions act --repeats 3   # the plain forward and ACT only
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from contextlib import contextmanager

import torch

from probe import (InterventionSpec, SinkCalibration, Temperature, Uniform, ZeroAblate, fast, intervene,
                   load_model)

MODEL = "smollm2-135m"
N_HEADS = 110


def heads_of(model, n: int, seed: int = 0) -> list[str]:
    every = [f"L{l}H{h}" for l in range(model.n_layers) for h in range(model.n_heads)]
    return sorted(random.Random(seed).sample(every, min(n, len(every))))


def conditions(heads: list[str]) -> dict[str, InterventionSpec | None]:
    return {"plain": None,
            "act": InterventionSpec([SinkCalibration(heads=heads, beta=0.4)]),
            "act_previous_path": InterventionSpec([SinkCalibration(heads=heads, beta=0.4)]),
            "zero_ablate": InterventionSpec([ZeroAblate(heads=heads)]),
            "uniform": InterventionSpec([Uniform(heads=heads)]),
            "temperature": InterventionSpec([Temperature(heads=heads, temperature=2.0)])}


@contextmanager
def previous_path(on: bool):
    """The engine before probe.fast's ACT path (eager separate accumulators), for the before/after."""
    if not on:
        yield
        return
    orig = fast.act_supported
    fast.act_supported = lambda *a: False
    try:
        yield
    finally:
        fast.act_supported = orig


def timed(model, ids, spec, previous: bool) -> tuple[float, float]:
    """``(wall, process CPU)`` seconds of one forward under ``spec``."""
    with torch.no_grad(), previous_path(previous), (intervene(model, spec) if spec else _nothing()):
        t0, c0 = time.perf_counter(), time.process_time()
        model.hf(ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0, time.process_time() - c0


@contextmanager
def _nothing():
    yield


def run(model, n_tokens: int, repeats: int, heads: list[str], only: list[str] | None = None) -> dict:
    ids = torch.randint(100, model.hf.config.vocab_size - 100, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    conds = {k: v for k, v in conditions(heads).items() if k == "plain" or not only or k in only}
    timed(model, ids, None, False)  # warm-up
    times = {name: [] for name in conds}
    cpu = {name: [] for name in conds}
    for _ in range(repeats):
        for name, spec in conds.items():
            wall, used = timed(model, ids, spec, name == "act_previous_path")
            times[name].append(wall)
            cpu[name].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"n_tokens": n_tokens, "median_s": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items() if k != "plain"},
            "cpu_ratio_to_plain": {k: round(v / med_cpu["plain"], 3) for k, v in med_cpu.items() if k != "plain"},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "all_cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--conditions", default="", help="comma-separated subset (the plain forward always runs), "
                                                     f"of {','.join(conditions([]))}")
    args = ap.parse_args()
    only = [c for c in args.conditions.split(",") if c]
    unknown = set(only) - set(conditions([]))
    if unknown:
        ap.error(f"unknown conditions {sorted(unknown)}; choose from {', '.join(conditions([]))}")
    lengths, repeats = ([128], 1) if args.quick else ([int(x) for x in args.lengths.split(",")], args.repeats)
    model = load_model(MODEL, device="cpu")
    heads = heads_of(model, N_HEADS)
    out = {"model": MODEL, "heads": len(heads), "threads": torch.get_num_threads(),
           "load_average": [round(x, 2) for x in os.getloadavg()], "runs": [run(model, n, repeats, heads, only) for n in lengths]}
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
