#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py), one command, on a CUDA machine whose Python has torch,
# transformers, safetensors (and accelerate, peft, typer, rich, tqdm) but maybe not pydantic.
#
#   benchmarks/gpu_check.sh [OUT]          # default OUT: /tmp/cfsp-gpu-check
#
# Inputs (benchmarks/gpu_bundle.sh prepares them in .gpu/ on a machine with cfsp installed):
#   CFSP_GPU_MODEL   converted SmolLM2-135M folder (default .gpu/smollm2-135m; where only its
#                    split parts .gpu/smollm2-135m.part-* are present, they are joined first)
#   CFSP_GPU_WHEELS  wheels installed (offline) when pydantic is missing (default .gpu/wheels)
#   CFSP_HOME        cfsp's cache, for the Botchan text (default .gpu/home)
#   PYTHON           the interpreter (default python3)
# Extra arguments after OUT go to benchmarks/gpu_check.py (e.g. --device cuda:1).
# Exit 0: CUDA and CPU agree; 1: they do not; 2: missing inputs. Budget: 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-/tmp/cfsp-gpu-check}
shift || true
MODEL=${CFSP_GPU_MODEL:-.gpu/smollm2-135m}
WHEELS=${CFSP_GPU_WHEELS:-.gpu/wheels}
export CFSP_HOME=${CFSP_HOME:-$PWD/.gpu/home}

if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "error: pydantic is missing and $WHEELS holds no wheels (benchmarks/gpu_bundle.sh)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cfsp-gpu-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/cfsp-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -f "$MODEL/model.safetensors" ] && ls "$MODEL".part-* >/dev/null 2>&1; then
    mkdir -p "$MODEL"
    cat "$MODEL".part-* | tar -xf - -C "$MODEL"
fi
if [ ! -f "$MODEL/config.json" ]; then
    echo "error: no converted SmolLM2 folder at $MODEL (set CFSP_GPU_MODEL)" >&2
    exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout 480 "$PY" -m benchmarks.gpu_check --model "$MODEL" --out "$OUT" "$@"
