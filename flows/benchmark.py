"""Prefect flow `benchmark`: the benchmark suite as a scheduled-pipeline citizen.

The suite stays ONE process and ONE task (its calibration statistics are captured once and
shared by every row, and its timings need the cores to itself), so the flow adds what a team
dashboard needs around it: a flow run with the suite's log, the targets table and every row
as Prefect artifacts, and the targets as the flow's result. This module lives in the checkout
only (it imports the uninstalled `benchmarks` package); nothing installed imports it.

  python -m flows.benchmark                          # same options as python -m benchmarks.suite
  python -m flows.benchmark --budgets 0.2 --methods default flap+liar --tasks ''
"""

from __future__ import annotations

import sys

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from benchmarks.suite import main as run_suite
from benchmarks.suite import parse_args
from benchmarks.targets import row_cells, targets_markdown
from cfsp.io import read_json
from cfsp.metrics import render_table


@task(name="benchmark-suite", persist_result=False, result_serializer="json")
def suite_task(argv: list[str]) -> str:
    """Run (or resume) the suite; returns the path of its JSON result."""
    run_suite(argv)
    return str(parse_args(argv).out)


@flow(name="benchmark", log_prints=True, persist_result=False, result_serializer="json")
def benchmark(argv: list[str] | None = None) -> list[dict]:
    """Every method x budget on one model (see benchmarks/suite.py); returns the targets."""
    result = read_json(suite_task(list(argv or [])))
    create_markdown_artifact(
        key="benchmark-targets",
        markdown="# Benchmark targets\n\n" + targets_markdown(result["targets"]),
        description="cfsp benchmark suite: targets met or not, with numbers",
    )
    create_markdown_artifact(
        key="benchmark-rows",
        markdown=render_table([row_cells(r) for r in result["rows"]]),
        description="cfsp benchmark suite: one row per method and budget (as in BENCHMARKS.md)",
    )
    return result["targets"]


if __name__ == "__main__":
    from cfsp.prefect_env import configure_prefect

    parse_args(sys.argv[1:])  # --help and bad options answered before any server starts
    configure_prefect()
    targets = benchmark(sys.argv[1:])
    print(targets_markdown(targets))
