#!/usr/bin/env bash
# Install everything, then run the main job: the whole pipeline (`cfsp run`, params.yaml) on
# the embedded SmolLM2-135M at budget 0.3 with the default method. No model hub needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cfsp run "$@"
