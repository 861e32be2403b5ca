"""Peak memory and time: per-head statistics from cached patterns vs streaming statistics.

(a) TransformerLens-style: ``run_with_cache`` on every ``hook_pattern`` (``[layers, heads, T, T]``),
    then the same statistics computed from the patterns;
(b) headwise streaming statistics (chunked inside attention; never ``T x T`` per head).
Each measurement runs in a fresh subprocess so its peak RSS is its own; the streaming run also
reports the planner's memory estimate (what ``stream_stats`` prints before a long run) next to
the measured growth of the process. Then, in one more subprocess, the time ratio to the floor:
a plain forward (the model's SDPA) and streaming statistics (every layer, all statistics,
received sums, two key groups; ``stream`` keeps the model's own attention output bit for bit,
``stream_output_pass`` builds it from the statistics pass, ``output="pass"``), plus the previous engine
path (all-eager chunks), interleaved,
medians of ``--repeats``; the process CPU time beside the wall time (on a shared machine, with one
thread, the CPU-time ratio is the steadier figure). Prints one JSON object.

    python bench/stats_memory.py            # T = 1024, 2048 for both; 4096, 8192 streaming only; ratios at 2048, 8192
    python bench/stats_memory.py --quick    # T = 256 (a smoke run; ratio at 256, one round)
    python bench/stats_memory.py --ratio-worker 2048 3 --no-previous   # the ratio alone, without the eager path
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"


def text_of(n_tokens: int, model):
    import torch

    base = (Path(__file__).resolve().parent.parent / "data" / "bench_text.txt")
    words = base.read_text() if base.exists() else "The quick brown fox jumps over the lazy dog. " * 50
    ids = model.tokenizer(words, return_tensors="pt").input_ids[0]
    reps = n_tokens // len(ids) + 1
    return torch.cat([ids] * reps)[:n_tokens][None]


def stats_from_patterns(pats):
    """pats [L, H, T, T] -> the streaming statistics (entropy, max, argmax, received sums)."""
    import torch

    ent = -(pats * torch.log(pats.clamp_min(torch.finfo(pats.dtype).tiny))).sum(-1)
    return {"entropy": ent, "max_prob": pats.max(-1).values, "argmax": pats.argmax(-1),
            "received_sum": pats.sum(2)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(mode: str, n_tokens: int, out: str) -> None:
    import torch

    from probe import load_model, stream_stats
    from probe.streaming import plan_stream

    torch.set_grad_enabled(False)
    model = load_model(MODEL, device="cpu")
    ids = text_of(n_tokens, model)
    predicted = plan_stream(model, n_tokens, 0, timed=False).memory.bytes
    before = _rss()
    if mode == "cache":
        _ = model.bridge  # build before timing, like stream mode's install
    t0 = time.perf_counter()
    if mode == "cache":
        names = {f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)}
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        pats = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(model.n_layers)])
        stats = stats_from_patterns(pats)
    else:
        st = stream_stats(model, ids, verbose=False)
        stats = {"entropy": st.entropy, "max_prob": st.max_prob, "argmax": st.argmax, "received_sum": st.received_sum}
    wall = time.perf_counter() - t0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in stats.items()}, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"wall_s": round(wall, 3), "peak_rss_bytes": peak}
    if mode == "stream":
        res["planner"] = {"predicted_mib": round(predicted / 2**20, 1),
                          "measured_growth_mib": round((peak - before) / 2**20, 1)}
    print(json.dumps(res))


def ratio_worker(lengths: list[int], repeats: int, previous: bool = True) -> None:
    """Plain forward vs streaming statistics (and the previous all-eager path), interleaved, medians."""
    import statistics

    import torch

    from probe import KeyGroup, fast, load_model, stream_stats

    torch.set_grad_enabled(False)
    model = load_model(MODEL, device="cpu")
    orig, out = fast.supported, {}
    for n in lengths:
        ids = text_of(n, model)
        groups = [KeyGroup("first", 0, 1), KeyGroup("needle", n // 2, n // 2 + 32)]

        def plain(ids=ids):
            model.hf(ids, use_cache=False, logits_to_keep=1)

        def stream(previous=False, ids=ids, groups=groups, output="model"):
            fast.supported = (lambda *a: False) if previous else orig
            try:
                stream_stats(model, ids, groups=groups, verbose=False, output=output)
            finally:
                fast.supported = orig

        plain()
        runs = (("plain", plain), ("stream", stream), ("stream_output_pass", lambda: stream(output="pass")))
        runs += (("stream_previous_path", lambda: stream(True)),) if previous else ()
        times = {name: [] for name, _ in runs}
        cpu = {name: [] for name, _ in runs}
        for _ in range(repeats):
            for name, fn in runs:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        out[n] = {"median_s": {k: round(v, 3) for k, v in med.items()},
                  "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items() if k != "plain"},
                  "cpu_ratio_to_plain": {k: round(v / med_cpu["plain"], 3) for k, v in med_cpu.items() if k != "plain"},
                  "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                  "all_cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()}}
    print(json.dumps(out))


def measure(mode: str, n_tokens: int, tmp: Path) -> dict:
    out = tmp / f"{mode}_{n_tokens}.safetensors"
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(n_tokens), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["peak_rss_gib"] = round(res.pop("peak_rss_bytes") / 2**30, 3)
    res["file"] = str(out)
    return res


def max_diff(a: str, b: str) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    out = {k: float((x[k].float() - y[k].float()).abs().max()) for k in ("entropy", "max_prob", "received_sum")}
    out["argmax_agreement"] = float((x["argmax"] == y["argmax"]).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--ratio-worker", nargs=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio-lengths", default="2048,8192")
    ap.add_argument("--no-previous", action="store_true", help="ratio worker: skip the previous all-eager path")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    if args.ratio_worker:
        ratio_worker([int(x) for x in args.ratio_worker[0].split(",")], int(args.ratio_worker[1]), not args.no_previous)
        return
    both, stream_only = ([256], []) if args.quick else ([1024, 2048], [4096, 8192])
    result = {"model": MODEL, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in both:
            result["runs"][n] = {"cache": measure("cache", n, tmp), "stream": measure("stream", n, tmp)}
            r = result["runs"][n]
            if "error" not in r["cache"] and "error" not in r["stream"]:
                r["rss_ratio_cache_over_stream"] = round(r["cache"]["peak_rss_gib"] / r["stream"]["peak_rss_gib"], 2)
                r["time_ratio_cache_over_stream"] = round(r["cache"]["wall_s"] / r["stream"]["wall_s"], 2)
        first = both[0]
        r = result["runs"][first]
        if "file" in r["cache"] and "file" in r["stream"]:
            result[f"max_abs_diff_at_{first}"] = max_diff(r["cache"]["file"], r["stream"]["file"])
        for n in stream_only:
            result["runs"][n] = {"stream": measure("stream", n, tmp)}
        lengths, repeats = ("256", 1) if args.quick else (args.ratio_lengths, args.repeats)
        proc = subprocess.run([sys.executable, __file__, "--ratio-worker", lengths, str(repeats)],
                              capture_output=True, text=True)
        result["time_vs_plain_forward"] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                           else {"error": (proc.stderr or "failed").strip().splitlines()[-1:]})
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        for runs in result["runs"].values():
            for v in runs.values():
                if isinstance(v, dict):
                    v.pop("file", None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
