"""The benchmarks' ``--quick`` modes as smoke tests (bench/interventions.py, stats_memory.py, planner.py,
similarity.py, patching.py, retrieval_scan.py, calibration_overhead.py).

No timing is asserted (timings live in the benches' JSON); what is asserted is that each bench runs,
reports what it promises, and that its fast path computed the same numbers as the baseline it is timed against.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _run_script(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)




def test_interventions_bench_quick():
    out = _run_script("interventions.py", "--quick")
    run = out["runs"][0]
    assert out["heads"] == 110 and run["n_tokens"] == 128
    assert set(run["ratio_to_plain"]) == {"act", "act_previous_path", "zero_ablate", "uniform", "temperature"}
    assert all(v > 0 for v in run["ratio_to_plain"].values())


def test_stats_memory_ratio_quick():
    """The same-process ratio part of bench/stats_memory.py (the TransformerLens cache comparison is too slow for the suite)."""
    proc = subprocess.run([sys.executable, str(BENCH / "stats_memory.py"), "--ratio-worker", "128", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = json.loads(proc.stdout.strip().splitlines()[-1])["128"]
    assert set(ratio["ratio_to_plain"]) == {"stream", "stream_output_pass", "stream_previous_path"}
    assert all(v > 0 for v in ratio["ratio_to_plain"].values())


def test_planner_bench_quick():
    """bench/planner.py: the announced estimate (time calibrated here, memory) beside the measured run."""
    out = _run_script("planner.py", "--quick")
    run = out["runs"][0]
    assert run["n_tokens"] == 256 and "time calibrated on this machine" in run["announced"]
    assert run["time_s"]["predicted"] > 0 and run["time_s"]["measured"] > 0
    assert run["memory_mib"]["predicted"] > 0 and run["memory_mib"]["measured_growth"] >= 0


def _run(name: str, capsys) -> dict:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick"])
    return json.loads(capsys.readouterr().out)


def test_similarity_bench_quick(capsys):
    out = _run("similarity", capsys)
    (row,) = out["rows"]
    assert out["model"] == "tiny-llama" and row["tokens"] == 64 and row["plain_s"] > 0 and row["ours_s"] > 0
    assert set(row["phases"]) == {"forward_s", "patterns_s", "products_s", "total_s"}


def test_patching_bench_quick(capsys):
    out = _run("patching", capsys)
    assert out["max_abs_diff"] < 1e-5                               # resumed == rerun from the embeddings
    L = 2                                                            # tiny-llama: before = L forwards a batch
    assert out["forwards_equivalent_per_batch"] == {"before": float(L), "after": 1 + (L + 1) / 2}


@pytest.mark.slow
def test_retrieval_bench_quick(capsys):
    out = _run("retrieval_scan", capsys)
    (s,) = out["samples"]
    assert out["max_abs_diff"] == 0.0 and s["same_tokens"]        # identical scores and tokens to generate()
    assert s["ours_phases"]["new_tokens"] > 0 and s["reference_s"] > 0


def test_calibration_overhead_bench_quick(capsys):
    out = _run("calibration_overhead", capsys)
    r = out["lengths"]["64"]
    assert out["model"] == "smollm2-135m" and len(out["heads"]) == 2
    assert r["forward_plain_s"] > 0 and r["forward_calibrated_s"] > 0 and r["generate_ratio"] > 0
    assert r["logits_max_abs_change"] > 1e-6                     # the timed calibration really acts
