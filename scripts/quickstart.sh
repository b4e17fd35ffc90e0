#!/usr/bin/env bash
# Install everything, then run the main job on the embedded default model (no hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cfsp eval --model smollm2-135m --data botchan --seqlen 128 --limit 64 "$@"
