"""Benchmark: wall time of exact per-head patching vs EAP / EAP-IG on one task, and their rank agreement.

    PYTHONPATH=$PWD python bench/patching.py --task ioi --n 16 --threads 1

Prints one JSON object. Exact patching costs one forward per (layer x prompt chunk) with the
batch holding every head of the layer; EAP costs one forward+backward per prompt chunk.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from analyses.circuits import patching as P
from analyses.circuits.overlap import rank_correlation, select_circuit, jaccard
from analyses.circuits.tasks import make_task
from probe import DEFAULT_MODEL, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    task = make_task(model, args.task, args.n)
    ld_clean = P.run_ld(model, task.clean, task.good, task.bad)
    ld_corr = P.run_ld(model, task.corrupt, task.good, task.bad)
    t0 = time.perf_counter()
    z_clean, z_corr = P.record_z(model, task.clean), P.record_z(model, task.corrupt)
    t_record = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = P.normalised(P.exact_patching(model, task, z_corr), ld_clean, ld_corr)
    t_exact = time.perf_counter() - t0
    denom = ld_corr.mean() - ld_clean.mean()
    t0 = time.perf_counter()
    eap = P.attribution_patching(model, task, z_clean, z_corr).mean(0) / denom
    t_eap = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = P.attribution_patching(model, task, z_clean, z_corr, ig_steps=args.ig_steps).mean(0) / denom
    t_ig = time.perf_counter() - t0
    top = {m: select_circuit(s.numpy(), 0.05) for m, s in (("exact", exact), ("eap", eap), ("eap_ig", ig))}
    print(json.dumps({
        "model": model.model_id, "task": args.task, "n_prompts": task.n, "seq_len": task.clean.shape[1],
        "n_heads": model.n_layers * model.n_heads, "threads": torch.get_num_threads(),
        "record_s": round(t_record, 2), "exact_s": round(t_exact, 2), "eap_s": round(t_eap, 2),
        "eap_ig_s": round(t_ig, 2), "ig_steps": args.ig_steps, "speedup_eap": round(t_exact / t_eap, 1),
        "spearman_exact_eap": round(rank_correlation(exact, eap), 3),
        "spearman_exact_eap_ig": round(rank_correlation(exact, ig), 3),
        "jaccard_top5pct_exact_eap": round(jaccard(top["exact"], top["eap"]), 3),
        "jaccard_top5pct_exact_eap_ig": round(jaccard(top["exact"], top["eap_ig"]), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
