#!/usr/bin/env bash
# Install cfsp and everything it needs into ./.venv (idempotent; re-running is quick).
# CPU torch 2.13.0 is installed first when the venv has no torch: an unpinned torch would
# pull a multi-GB CUDA build. Set CFSP_TORCH to install another torch spec instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing ${CFSP_TORCH:-torch==2.13.0} (CPU)"
  .venv/bin/python -m pip install -q "${CFSP_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "installing cfsp and its dependencies"
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import cfsp, torch, transformers; print('cfsp', cfsp.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
