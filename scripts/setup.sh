#!/usr/bin/env bash
# Install cfsp and everything it needs into ./.venv from the lock (idempotent; re-running is quick).
# Versions come from constraints.txt (exact pins of the tested environment; scripts/lock.sh
# regenerates it). CPU torch 2.13.0 is installed first when the venv has no torch: an unpinned
# torch would pull a multi-GB CUDA build. Set CFSP_TORCH to install another torch spec instead
# (the lock's torch pin is then left out; pip options may follow the spec, e.g. an index URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
lock=constraints.txt
if [ -n "${CFSP_TORCH:-}" ]; then
  lock=$(mktemp)
  trap 'rm -f "$lock"' EXIT
  grep -v '^torch==' constraints.txt >"$lock"
fi
# Run pip without its "WARNING: Location" noise; a failing pip still fails this script.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
quiet .venv/bin/python -m pip install -q --upgrade pip || echo "note: pip not upgraded; going on"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing ${CFSP_TORCH:-torch==2.13.0 (CPU)}"
  quiet .venv/bin/python -m pip install -q -c "$lock" ${CFSP_TORCH:-torch==2.13.0}
fi
echo "installing cfsp and its dependencies (versions from constraints.txt)"
quiet .venv/bin/python -m pip install -q -c "$lock" -e ".[dev]"
.venv/bin/python -c "import cfsp, torch, transformers; print('cfsp', cfsp.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
