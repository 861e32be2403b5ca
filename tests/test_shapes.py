"""The shape vocabulary (probe.shapes) is checked at run time: jaxtyping's import hook with beartype
instruments every module of ``analyses``, then real runs on tiny-llama must pass and a wrongly shaped
call must fail. In a subprocess, so the instrumented modules never mix with the suite's own imports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
from jaxtyping import install_import_hook
with install_import_hook(["analyses"], "beartype.beartype"):
    from analyses import run
    from analyses.circuits import CIRCUITS, CircuitsConfig
    from analyses.retrieval import RETRIEVAL, RetrievalConfig, RetrievalResult, sample_events
    from analyses.similarity import Accumulator
    from analyses.grounding import span_feature
import numpy as np, pandas as pd, torch
from probe import load_model

m = load_model("tiny-llama")
res = run(RETRIEVAL, m, RetrievalConfig(cells=(("code", 200, 50.0),), k=2, seeds=(0,), max_new_tokens=2), progress=False)
run(CIRCUITS, m, CircuitsConfig(tasks=("induction",), n=2, ig_steps=1, frac=0.25, n_boot=3), progress=False)
print("runs ok", res.scores.shape)

def refused(f):
    try:
        f()
    except Exception as exc:                                   # beartype / jaxtyping type-check errors
        return "TypeCheck" in type(exc).__name__ or "Beartype" in type(exc).__name__ or "jaxtyping" in str(type(exc))
    return False

print("wrong argmax rank refused", refused(lambda: sample_events(torch.zeros(3, dtype=torch.long), [0], [1], [1], (0, 1))))
print("wrong pattern rank refused", refused(lambda: Accumulator(2, 4).add_window(torch.zeros(2, 4, 3))))
print("wrong score shape refused", refused(lambda: RetrievalResult("m", np.zeros(5), 1, 0.1, pd.DataFrame())))
print("wrong ratio rank refused", refused(lambda: span_feature(torch.zeros(3, 4))))
'''


@pytest.mark.slow
def test_public_interfaces_keep_their_shapes_at_run_time():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "runs ok (2, 4)" in lines
    for what in ("argmax rank", "pattern rank", "score shape", "ratio rank"):
        assert f"wrong {what} refused True" in lines, out.stdout
