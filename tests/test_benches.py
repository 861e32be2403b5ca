"""The speed benchmarks' ``--quick`` modes as smoke tests (bench/similarity.py, patching.py, retrieval_scan.py).

No timing is asserted (timings live in the benches' JSON); what is asserted is that each bench runs
and that its fast path computed the same numbers as the baseline it is timed against.
"""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


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
