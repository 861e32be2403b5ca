"""Scaling benchmark (issue 17): units per second serially and on 1 and 2 local Ray workers; prints JSON.

The units are retrieval NIAH samples (one prefill + greedy decode with streaming statistics each) on the
embedded model; every run writes to a fresh results folder, so every unit is computed. Figures:

* ``serial``: the runner in this process (1 torch thread), the baseline;
* ``workers_1``, ``workers_2``: the same units on a local Ray cluster, one torch thread per worker;
  ``start_s`` (cluster start + every worker loading the model once) is reported apart from the rate;
* ``efficiency_2 = rate(2 workers) / (2 x rate(1 worker))``: 1.0 is perfect scaling. On a machine with
  2 cores shared with other work it is bounded by the cores really free (``load_average`` says how busy);
* ``overhead_per_unit_s = (wall(1 worker) - wall(serial)) / units``: what Ray adds to each unit
  (shipping the task, the payload back, the driver's write), and ``roundtrip_s``: one empty actor call.

``--quick`` runs a few units on ``tiny-llama`` (the suite's smoke test).

    python bench/scale.py [--quick] [--units N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses.distributed import ModelRecipe, RayExecutor, diff_units, local_cluster, require_ray  # noqa: E402
from analyses.retrieval import RETRIEVAL, RetrievalConfig  # noqa: E402
from analyses.runner import run_stage  # noqa: E402
from probe import load_model  # noqa: E402


def config(n_units: int, context: int) -> RetrievalConfig:
    """``n_units`` NIAH cells (one sample each): one needle at evenly spread depths."""
    depths = [round(100.0 * (i + 0.5) / n_units, 2) for i in range(n_units)]
    cells = tuple(("code", context, d) for d in depths)
    return RetrievalConfig(cells=cells, mask_cells=cells[:1], k=2, seeds=(0,),
                           max_new_tokens=4)


def timed(model, cfg, folder: str, executor=None) -> float:
    """Wall time of the samples stage into ``folder`` (fresh: every unit is computed)."""
    from analyses.units import UnitStore

    t0 = time.perf_counter()
    run_stage(RETRIEVAL, RETRIEVAL.stage("samples"), model, cfg, None, UnitStore(folder), executor, progress=False)
    return time.perf_counter() - t0


def roundtrip(executor: RayExecutor, n: int = 20) -> float:
    ray = executor.ray
    actor = executor._actors[0]
    ray.get(actor.identity.remote())
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(actor.identity.remote())
    return (time.perf_counter() - t0) / n


def bench(name: str, n_units: int, context: int, root: Path) -> dict:
    require_ray()
    torch.set_num_threads(1)
    model = load_model(name)
    cfg = config(n_units, context)
    n = len(RETRIEVAL.stage("samples").plan(model, cfg, None))
    serial_s = timed(model, cfg, str(root / "serial"))
    out = {"bench": "scale", "model": model.model_id, "units": n, "unit": f"retrieval sample ({context} tokens)",
           "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
           "serial": {"wall_s": round(serial_s, 3), "units_per_s": round(n / serial_s, 4)}}
    with local_cluster(2):
        for workers in (1, 2):
            t0 = time.perf_counter()
            with RayExecutor(ModelRecipe(name, threads=1), workers) as ex:
                ex.start(model)                       # the workers start and load the model once each
                start_s = time.perf_counter() - t0
                wall = timed(model, cfg, str(root / f"workers{workers}"), ex)
                rt = roundtrip(ex) if workers == 1 else None
            differ = diff_units(root / "serial", root / f"workers{workers}")
            out[f"workers_{workers}"] = {"start_s": round(start_s, 2), "wall_s": round(wall, 3),
                                         "units_per_s": round(n / wall, 4), "units_equal_to_serial": not differ}
            if rt is not None:
                out["roundtrip_s"] = round(rt, 5)
    r1, r2 = out["workers_1"]["units_per_s"], out["workers_2"]["units_per_s"]
    out["speedup_2_vs_1"] = round(r2 / r1, 3)
    out["efficiency_2"] = round(r2 / (2 * r1), 3)
    out["overhead_per_unit_s"] = round((out["workers_1"]["wall_s"] - serial_s) / n, 4)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama, 4 units (smoke test)")
    p.add_argument("--units", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="tokens per NIAH prompt")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    name = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    with tempfile.TemporaryDirectory() as root:
        out = bench(name, args.units or (4 if args.quick else 6), args.context or (200 if args.quick else 500), Path(root))
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
