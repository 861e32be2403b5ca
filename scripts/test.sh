#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration on the embedded model,
# kernels under the Triton interpreter, notebooks and the headless-browser dashboard test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
. .venv/bin/activate
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
ruff check .
python -m pytest --durations=15 "$@"
