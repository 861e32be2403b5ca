"""``pip install .`` (a wheel, not editable) gives a working ``headwise`` with its data, away from the checkout."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_runs_a_tiny_scan(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True,
                   cwd=tmp_path)
    (wheel,) = wheels.glob("headwise-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"headwise_data/retrieval/needles.jsonl", "headwise_data/grounding/smollm2-135m/detector.json",
            "dashboards/app.py", "analyses/retrieval/run.py"} <= set(names)
    assert not any(n.startswith(("tests/", "notebooks/", "bench/")) for n in names)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    where = subprocess.run([sys.executable, "-c", "import analyses, analyses.data as d; print(analyses.__file__); "
                            "print(d.data_dir())"], env=env, cwd=work, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout   # not the checkout
    scan = subprocess.run([str(site / "bin" / "headwise"), "scan", "retrieval", "--model", "tiny-llama", "--cells",
                           "code:200:50", "--k", "2", "--seeds", "0", "--max-new-tokens", "2", "--out", "res"],
                          env=env, cwd=work, capture_output=True, text=True)
    assert scan.returncode == 0, scan.stderr
    assert "samples answered" in scan.stdout and (work / "res" / "summary.json").exists()
