"""The speed benchmarks' --quick modes run and report what they promise (no timing assertions: bench/ owns speed)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_interventions_bench_quick():
    out = _run("interventions.py", "--quick")
    run = out["runs"][0]
    assert out["heads"] == 110 and run["n_tokens"] == 128
    assert set(run["ratio_to_plain"]) == {"act", "act_previous_path", "zero_ablate", "uniform", "temperature"}
    assert all(v > 0 for v in run["ratio_to_plain"].values())


def test_stats_memory_ratio_quick():
    """The same-process ratio part of bench/stats_memory.py (the TransformerLens cache comparison is too slow for the suite)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stats_memory.py"), "--ratio-worker", "128", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = json.loads(proc.stdout.strip().splitlines()[-1])["128"]
    assert set(ratio["ratio_to_plain"]) == {"stream", "stream_previous_path"}
    assert all(v > 0 for v in ratio["ratio_to_plain"].values())
