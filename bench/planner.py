"""The planner against the run: predicted vs measured time and memory of streaming statistics (issue 20 item 5).

For each length, in a fresh subprocess (so the peak RSS is the run's own): calibrate the time
model on this machine (:func:`probe.planner.calibrate`: a short forward and one attention layer
on random tensors), print what ``stream_stats`` announces before a long run (time and memory),
then run it (every layer, two key groups, received sums) and measure its wall time and the growth
of the process's peak RSS. Prints one JSON object with both and their ratios (target: within 25%).

    python bench/planner.py                   # 2,048 and 8,192 tokens
    python bench/planner.py --lengths 2048
    python bench/planner.py --quick           # 256 tokens: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats_memory import MODEL, _rss, text_of  # noqa: E402


def reset_peak() -> None:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM) so the run's own peak is read."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """VmHWM in bytes (the peak RSS since :func:`reset_peak`); ``ru_maxrss`` where /proc lacks it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(n_tokens: int, output: str = "model") -> dict:
    import torch

    from probe import KeyGroup, load_model, stream_stats
    from probe.streaming import plan_stream

    torch.set_grad_enabled(False)
    model = load_model(MODEL, device="cpu")
    ids = text_of(n_tokens, model)
    groups = [KeyGroup("first", 0, 1), KeyGroup("needle", n_tokens // 2, n_tokens // 2 + 32)]
    t0 = time.perf_counter()
    plan = plan_stream(model, n_tokens, len(groups), output=output)
    calibration_s = time.perf_counter() - t0
    before = _rss()
    reset_peak()
    t0 = time.perf_counter()
    stream_stats(model, ids, groups=groups, verbose=False, output=output)
    wall = time.perf_counter() - t0
    growth = max(peak_rss() - before, 0)
    return {"n_tokens": n_tokens, "output": output, "announced": plan.line, "calibration_s": round(calibration_s, 2),
            "time_s": {"predicted": round(plan.seconds, 2), "measured": round(wall, 2),
                       "ratio_measured_over_predicted": round(wall / plan.seconds, 3)},
            "memory_mib": {"predicted": round(plan.memory.bytes / 2**20, 1), "measured_growth": round(growth / 2**20, 1),
                           "ratio_measured_over_predicted": round(growth / plan.memory.bytes, 3)},
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", type=int)
    ap.add_argument("--output", default="model", choices=("model", "pass"),
                    help="stream_stats output mode (probe.stats.StatsRequest)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.output)))
        return
    lengths = [256] if args.quick else [int(x) for x in args.lengths.split(",")]
    out = {"model": MODEL, "load_average": [round(x, 2) for x in os.getloadavg()], "runs": []}
    for n in lengths:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--output", args.output], capture_output=True, text=True)
        out["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                           {"n_tokens": n, "error": (proc.stderr or "failed").strip().splitlines()[-1:]})
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
