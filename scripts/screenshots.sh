#!/usr/bin/env bash
# Regenerate the dashboard screenshots in docs/ (linked from README, "How to read the
# dashboards"): a small real sweep against a real Prefect server, then headless Chromium on
#   docs/mlflow-runs.png       the MLflow runs table of the experiment (runs named by budget)
#   docs/mlflow-run.png        one child run: metrics, params, lineage tags, logged model
#   docs/mlflow-run-artifacts.png  its artifacts (the allocation plot open)
#   docs/prefect-flow-run.png  the sweep's flow run: its task graph with the task names
# Needs Chromium (`apt-get install -y chromium`): a documentation prerequisite only, never a
# test or CI dependency. Everything runs on 127.0.0.1 in a temporary folder, removed at the end;
# servers started here are stopped on exit. Takes a few minutes on a laptop CPU.
# Usage: scripts/screenshots.sh [extra `cfsp run` options, e.g. -S 'budgets=[0.1,0.2,0.3]']
# SCREENSHOTS_WORK=DIR keeps the sweep (Prefect home, outputs, MLflow store) in DIR instead: a
# rerun with the same DIR skips the sweep and only captures again.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [[ -z "$CHROMIUM" ]]; then
  echo "error: Chromium not found; install it (apt-get install -y chromium) or set CHROMIUM" >&2
  exit 2
fi
KEEP="${SCREENSHOTS_WORK:-}"
WORK="${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/cfsp-screenshots.XXXXXX")}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -n "$KEEP" ]] || rm -rf "$WORK"
}
trap cleanup EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's cfsp
export PREFECT_HOME="$WORK/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false
unset MLFLOW_TRACKING_URI

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {  # URL, what: poll until the URL answers (servers need tens of seconds here)
  for _ in $(seq 1 180); do
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" \
      2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "error: $2 did not answer at $1 within 3 minutes" >&2
  exit 1
}

PREFECT_PORT="$(free_port)"
MLFLOW_PORT="$(free_port)"
PREFECT_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api" \
  "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$WORK/prefect.log" 2>&1 &
PIDS+=($!)
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
wait_for "$PREFECT_API_URL/health" "the Prefect server"

# The sweep runs in $WORK with a copy of params.yaml, so its outputs (and `cfsp dashboard`'s
# MLflow store, <output>/mlflow.db) stay there.
cd "$WORK"
if [[ ! -f "$WORK/out/report/report.md" ]]; then
  cp "$ROOT/params.yaml" "$WORK/params.yaml"
  "$PY" -m cfsp.cli run -S 'budgets=[0.2,0.3]' -S prepare.nsamples=8 -S evaluate.limit=4 \
    -S evaluate.speed.enabled=false "$@"
fi
"$PY" -m cfsp.cli dashboard --port "$MLFLOW_PORT" >"$WORK/mlflow.log" 2>&1 &
PIDS+=($!)
MLFLOW="http://127.0.0.1:$MLFLOW_PORT"
wait_for "$MLFLOW/health" "the MLflow server"

# Ids for the UI's URLs, one a line: experiment, highest-budget child run and its name, the
# sweep's flow run and its name, then the runs table's saved view (columns by budget, parent
# expanded), which the MLflow UI reads from localStorage.
mapfile -t IDS < <("$PY" - "$MLFLOW" <<'EOF'
import asyncio
import json
import sys

import mlflow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort

client = mlflow.MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("cfsp")
runs = client.search_runs([exp.experiment_id])
children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
child = max(children, key=lambda r: float(r.data.params.get("budget", 0)))
metrics = sorted(k for k in child.data.metrics if k.startswith(("ppl/", "params/removed")))
columns = ["params.`budget`", "params.`method`", *(f"metrics.`{k}`" for k in metrics)]
name = "attributes.`Run Name`"
view = {  # column ids as the UI's grid names them; widths apply to the columns in the order
    "selectedColumns": columns,
    "runsExpanded": {r.data.tags["mlflow.parentRunId"]: True for r in children},
    "columnOrder": ["0", name, *columns, "runDateAndNestInfo"],
    "columnWidths": {name: 250, **{c: 90 for c in columns[:2]}, **{c: 200 for c in columns[2:]}},
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "startTime": "ALL",
    "lifecycleFilter": "Active",
    "searchFilter": "",
}


async def sweep_run():
    async with get_client() as prefect:
        flows = FlowFilter(name=FlowFilterName(any_=["sweep"]))
        newest = FlowRunSort.START_TIME_DESC
        return (await prefect.read_flow_runs(flow_filter=flows, sort=newest, limit=1))[0]


flow_run = asyncio.run(sweep_run())
print(exp.experiment_id, child.info.run_id, child.info.run_name, flow_run.id, flow_run.name,
      json.dumps(view), sep="\n")
EOF
)
EXP="${IDS[0]}" RUN="${IDS[1]}" RUN_NAME="${IDS[2]}" FLOW_RUN="${IDS[3]}" FLOW_NAME="${IDS[4]}"
VIEW_KEY="MLflowLocalStorage-1.1-ExperimentPage-[\"$EXP\"]-ReactComponentState"
QUIET=(--storage "mlflow.assistant.panelOpen_v1=false"
  --storage "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1=true")  # no assistant side panel
shoot() { "$PY" "$ROOT/scripts/screenshot.py" --chromium "$CHROMIUM" "$@"; }

DOCS="$ROOT/docs"
shoot "$MLFLOW/#/experiments/$EXP/runs" "$DOCS/mlflow-runs.png" --wait "$RUN_NAME" \
  --storage "$VIEW_KEY=${IDS[5]}" "${QUIET[@]}" --size 1500,420
shoot "$MLFLOW/#/experiments/$EXP/runs/$RUN" "$DOCS/mlflow-run.png" --wait "Parent run" \
  "${QUIET[@]}" --js "cfspClick('Close')" --size 1400,1150
shoot "$MLFLOW/#/experiments/$EXP/runs/$RUN/artifacts" "$DOCS/mlflow-run-artifacts.png" \
  --wait "allocation.png" "${QUIET[@]}" --js "cfspClick('Close')" \
  --js "cfspClick('allocation.png')" --size 1400,620
shoot "http://127.0.0.1:$PREFECT_PORT/runs/flow-run/$FLOW_RUN" "$DOCS/prefect-flow-run.png" \
  --wait "$FLOW_NAME" --js "cfspClick('Task Runs')" --size 1400,1000
