"""The circuits scan: every task's head scores, circuit and faithfulness; overlap; roles; intervention.

``headwise scan circuits --model M --tasks ioi,colored_objects,induction --out DIR`` writes one
result per finished task (rerunning skips those) and then the cross-task files.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from probe import families

from . import patching as P
from .overlap import OVERLAP_COLUMNS, overlap_table, select_circuit
from .result import CircuitsResult, TaskResult
from .roles import attention_to, intervention, random_heads_like, repeated_token_roles
from .tasks import make_task, parse_tasks


def run_task(model, name: str, n: int = 32, seed: int = 0, ig_steps: int = 5, frac: float = 0.05,
             progress: bool = True) -> TaskResult:
    """Exact patching, EAP and EAP-IG for every head on ``n`` prompts of task ``name``; circuit + faithfulness.

    >>> from probe import load_model
    >>> r = run_task(load_model("tiny-llama"), "induction", n=2, ig_steps=1, frac=0.25, progress=False)
    >>> r.scores().shape, len(r.circuit), sorted(r.effects)     # [layer, head]; 25% of 8 heads
    ((2, 4), 2, ['eap', 'eap_ig', 'exact'])

    On the embedded model: ``run_task(load_model("smollm2-135m"), "ioi", n=32)`` (minutes on a CPU).
    """
    families.family(model)  # EAP-IG feeds input embeddings: refuse an unknown family before any work
    task = make_task(model, name, n, seed)
    t0 = time.perf_counter()
    acc = P.accuracy(model, task)
    ld_clean = P.run_ld(model, task.clean, task.good, task.bad)
    ld_corr = P.run_ld(model, task.corrupt, task.good, task.bad)
    z_clean, z_corr = P.record_z(model, task.clean), P.record_z(model, task.corrupt)
    timings = {"setup_s": time.perf_counter() - t0}
    bar = tqdm(total=model.n_layers, desc=f"{name}: exact patching (layers)", disable=not progress)
    t0 = time.perf_counter()
    exact = P.exact_patching(model, task, z_corr, progress=bar) - ld_clean[:, None, None]
    bar.close()
    timings["exact_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eap = P.attribution_patching(model, task, z_clean, z_corr)
    timings["eap_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eap_ig = P.attribution_patching(model, task, z_clean, z_corr, ig_steps=ig_steps)
    timings["eap_ig_s"] = time.perf_counter() - t0
    effects = {"exact": exact.numpy().astype(np.float64), "eap": eap.numpy().astype(np.float64),
               "eap_ig": eap_ig.numpy().astype(np.float64)}
    ldc, ldr = ld_clean.numpy().astype(np.float64), ld_corr.numpy().astype(np.float64)
    scores = effects["exact"].mean(0) / (ldr.mean() - ldc.mean())
    circuit = select_circuit(scores, frac)
    means = P.mean_values(z_clean)
    faith = P.faithfulness(model, task, circuit, means, ld_clean)
    control = random_heads_like(circuit, model.n_heads, seed)  # same layers, random heads
    faith["random_control"] = P.faithfulness(model, task, control, means, ld_clean)
    acc["mean_ld_corrupt"] = float(ldr.mean())
    rule = {"rule": "top fraction of heads by |normalised exact patching score|", "frac": frac,
            "size": len(circuit), "n_prompts": n, "seed": seed, "ig_steps": ig_steps}
    return TaskResult(name, model.model_id, acc, ldc, ldr, effects, tuple(circuit), rule, faith, timings)


def scan(model, tasks, out, n: int = 32, seed: int = 0, ig_steps: int = 5, frac: float = 0.05,
         n_boot: int = 200, progress: bool = True) -> CircuitsResult:
    """Run :func:`run_task` per task (resumable: finished tasks are loaded), then overlap, roles, intervention.

    >>> import tempfile
    >>> from probe import load_model
    >>> r = scan(load_model("tiny-llama"), ["induction"], tempfile.mkdtemp(), n=2, ig_steps=1, frac=0.25,
    ...          n_boot=5, progress=False)
    >>> [t.task for t in r.tasks], sorted(r.roles)[:3]
    (['induction'], ['duplicate_token', 'induction', 'mover_induction'])
    """
    out = Path(out)
    results = []
    for name in tqdm(tasks, desc="tasks", disable=not progress):
        if (out / f"task_{name}.json").exists() and (out / f"task_{name}.parquet").exists():
            results.append(TaskResult.load(out, name))
            continue
        r = run_task(model, name, n, seed, ig_steps, frac, progress)
        r.save(out)
        results.append(r)
    per_prompt = {r.task: (r.patched(), r.ld_clean, r.ld_corr) for r in results}
    overlap = pd.DataFrame(overlap_table(per_prompt, frac, n_boot, seed), columns=OVERLAP_COLUMNS)
    roles = repeated_token_roles(model, seed=seed)
    by_name = {r.task: r for r in results}
    for r in results:
        key = "answer" if r.task != "greater_than" else None
        if key:
            task = make_task(model, r.task, min(r.rule["n_prompts"], 16), seed)
            roles[f"mover_{r.task}"] = attention_to(model, task, key)
    steer = {}
    if {"ioi", "colored_objects"} <= set(by_name):
        ioi_task = make_task(model, "ioi", 16, seed)
        roles["inhibition_s2_ioi"] = attention_to(model, ioi_task, "s2")
        steer = intervention(model, by_name["ioi"].scores(), by_name["colored_objects"].circuit,
                             roles["inhibition_s2_ioi"], make_task(model, "colored_objects", 32, seed + 1),
                             make_task(model, "colored_objects", 64, seed + 2))
    result = CircuitsResult(model.model_id, tuple(results), overlap, roles, steer)
    result.save(out)
    return result


def add_cli(subparsers) -> None:
    s = subparsers.add_parser("circuits", help="circuits across tasks and their overlap (Merullo et al. 2024)")
    s.add_argument("--model", default=None)
    s.add_argument("--tasks", default="ioi,colored_objects,induction", help="comma-separated: "
                   "ioi, colored_objects, induction, greater_than")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=32, help="prompts per task (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ig-steps", type=int, default=5, help="EAP-IG interpolation steps (default 5)")
    s.add_argument("--frac", type=float, default=0.05, help="circuit = top fraction of heads by |score|")
    s.add_argument("--boot", type=int, default=200, help="bootstrap resamples over prompts")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    s.set_defaults(run=_run)


def _run(args) -> int:
    from probe import DEFAULT_MODEL, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    names = parse_tasks(args.tasks)
    model = load_model(args.model or DEFAULT_MODEL)
    r = scan(model, names, args.out, args.n, args.seed, args.ig_steps, args.frac, args.boot)
    for t in r.tasks:
        f = t.faithfulness
        print(f"{t.task:16s} acc {t.accuracy['pair_accuracy']:.2f} LD {t.accuracy['mean_ld']:.2f} "
              f"circuit {len(t.circuit)} kept {f['kept']:.2f} removed {f['removed']:.2f}")
    print(f"wrote {args.out}")
    return 0
