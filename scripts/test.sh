#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration on the embedded model,
# kernels under the Triton interpreter, notebooks and the headless-browser dashboard test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
. .venv/bin/activate
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
ruff check .
# One worker per core (at most 4: each loads the embedded model), one torch thread each; the notebooks
# and the browser tests start first (tests/conftest.py). `bash scripts/test.sh -n 0` runs in one process.
workers=$(python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -n "$workers" --dist worksteal --durations=15 "$@"
