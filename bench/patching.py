"""Benchmark: exact per-head patching resumed from the patched layer vs rerun from the embeddings; EAP / EAP-IG.

    PYTHONPATH=$PWD python bench/patching.py --task ioi --n 16 --threads 1
    PYTHONPATH=$PWD python bench/patching.py --quick          # tiny model, 4 prompts: a smoke run

Prints one JSON object. Exact patching batches every head of a layer (the batch holds head x prompt
copies). ``before`` (``resume=False``) runs the whole model once per layer and prompt batch; ``after``
(the default) runs each batch once through ``probe.families.record`` and reruns only blocks
``l..L-1`` for the patch of layer ``l``. Both are timed in this process, interleaved, medians of
``--repeats``; their cost is also counted exactly as *forwards-equivalent per prompt batch* (block
calls / L, so one full forward = 1). ``max_abs_diff`` is the largest difference of their scores.
EAP costs one forward+backward per prompt chunk; its rank agreement with exact patching is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from analyses.circuits import patching as P
from analyses.circuits.overlap import jaccard, rank_correlation, select_circuit
from analyses.circuits.tasks import make_task
from probe import DEFAULT_MODEL, families, load_model


def block_calls(model, fn) -> tuple[object, int]:
    """``fn()``'s result and how many decoder-block calls it made."""
    count = [0]
    hooks = [b.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1)) for b in families.blocks(model)]
    try:
        return fn(), count[0]
    finally:
        for h in hooks:
            h.remove()


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 prompts, one repeat (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.task, args.n, args.ig_steps, args.repeats = "tiny-llama", "induction", 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    task = make_task(model, args.task, args.n)
    ld_clean = P.run_ld(model, task.clean, task.good, task.bad)
    ld_corr = P.run_ld(model, task.corrupt, task.good, task.bad)
    (z_clean, z_corr), t_record = timed(lambda: (P.record_z(model, task.clean), P.record_z(model, task.corrupt)))
    runs = {"before": lambda: P.exact_patching(model, task, z_corr, resume=False),
            "after": lambda: P.exact_patching(model, task, z_corr)}
    times, out, calls = {k: [] for k in runs}, {}, {}
    for k, fn in runs.items():  # warm-up, and the exact count of block calls
        out[k], calls[k] = block_calls(model, fn)
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn)[1])
    batches = -(-task.n // max(1, 96 // model.n_heads))
    fwd_eq = {k: round(c / model.n_layers / batches, 2) for k, c in calls.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    exact = P.normalised(out["after"], ld_clean, ld_corr)
    denom = ld_corr.mean() - ld_clean.mean()
    eap, t_eap = timed(lambda: P.attribution_patching(model, task, z_clean, z_corr).mean(0) / denom)
    ig, t_ig = timed(lambda: P.attribution_patching(model, task, z_clean, z_corr, ig_steps=args.ig_steps).mean(0)
                     / denom)
    top = {m: select_circuit(s.numpy(), 0.05) for m, s in (("exact", exact), ("eap", eap), ("eap_ig", ig))}
    print(json.dumps({
        "bench": "patching", "model": model.model_id, "task": args.task, "n_prompts": task.n,
        "seq_len": task.clean.shape[1], "n_heads": model.n_layers * model.n_heads, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "record_s": round(t_record, 2),
        "exact_before_s": round(med["before"], 2), "exact_after_s": round(med["after"], 2),
        "speedup_resume": round(med["before"] / med["after"], 2),
        "forwards_equivalent_per_batch": fwd_eq, "prompt_batches": batches,
        "max_abs_diff": float((out["after"] - out["before"]).abs().max()),
        "runs": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "eap_s": round(t_eap, 2), "eap_ig_s": round(t_ig, 2), "ig_steps": args.ig_steps,
        "speedup_eap": round(med["after"] / t_eap, 1),
        "spearman_exact_eap": round(rank_correlation(exact, eap), 3),
        "spearman_exact_eap_ig": round(rank_correlation(exact, ig), 3),
        "jaccard_top5pct_exact_eap": round(jaccard(top["exact"], top["eap"]), 3),
        "jaccard_top5pct_exact_eap_ig": round(jaccard(top["exact"], top["eap_ig"]), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
