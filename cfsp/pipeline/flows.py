"""Prefect flows: `sweep` over models x budgets x methods, and `compress` for one of each.

The flow only wires the registered stages (cfsp.pipeline.registry) together; every stage is a
task that exchanges artifact paths and content hashes. Artifacts live in the one store, at the
folders dvc.yaml declares (`<output>/dvc/MODEL/...`, cfsp.pipeline.store), and a stage whose
folder holds a fresh record of the same inputs is not run again. After the stages, the run's
lineage is recorded in DVC when the working directory is the DVC project and the run's params
are params.yaml's (cfsp.pipeline.lineage: `dvc commit`, so dvc.lock and .dvc/cache hold it);
the final step (cfsp.pipeline.publish, shared with dvc.yaml's `track` stage) writes the reports
and the MLflow runs, tagged with those dvc.lock entries.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from cfsp.config import Params, prune_config
from cfsp.io import read_json
from cfsp.metrics import render_table
from cfsp.pipeline import lineage as dvc_lineage
from cfsp.pipeline.keys import run_name, slug, sweep_name
from cfsp.pipeline.publish import grid_of, publish, start_parent, summarize
from cfsp.pipeline.registry import STAGES, sections
from cfsp.pipeline.store import side_output, stage_dir, write_side_output
from cfsp.pipeline.tasks import TASKS
from cfsp.pipeline.tracking import lineage_tags, preflight, track
from cfsp.preflight import check_params
from cfsp.report import allocation_rows, results_table
from cfsp.tracking import end_sweep


def _branch(params: Params, model: str, done: dict, run: tuple | None = None) -> dict:
    """Submit every registered stage of one model (run=None) or of one run = (model, budget,
    method) on top of the model's own stages (`done`: {stage: future}), in registry order, each
    into its folder of the store. A disabled stage (recover) still runs: it passes its input on
    as hard links, as in dvc.yaml."""
    per_method = run is not None
    where = (run[1], run[2]) if per_method else (None, None)
    prune = _prune_dict(params, *run) if per_method else None
    out = {}
    for name, stage in STAGES.items():
        if stage.per_method != per_method:
            continue
        seen = {**done, **out}
        out[name] = TASKS[name].submit(
            stage=name,
            model=model,
            out=str(stage_dir(params.output, name, model, *where)),
            inputs={i: seen[i] for i in stage.inputs},
            sections=sections(name, params),
            prune=prune,
            reference=model if per_method and name.startswith("evaluate") else None,
        )
    return out


def _side_outputs(lineage, records: dict, run: tuple) -> None:
    """metrics/ and plots/ files, as dvc.yaml's stages write them (only in the DVC project:
    elsewhere they would litter the working directory)."""
    if lineage.root is None:
        return
    model, budget, method = run
    for stage, record in records.items():
        where = (budget, method) if STAGES[stage].per_method else (None, None)
        path = side_output(stage, model, *where)
        if path is not None:
            write_side_output(stage, lineage.root / path, record["info"])


def _summaries(params: Params, grid: list[tuple[str, float, str]], lineage) -> list:
    """Submit every stage of the grid; (summary, stage records) of each run, in grid order."""
    models = list(dict.fromkeys(g[0] for g in grid))
    bases = {m: _branch(params, m, {}) for m in models}
    runs = [(run, _branch(params, run[0], bases[run[0]], run)) for run in grid]
    out = []
    for run, futures in runs:
        records = {name: f.result() for name, f in {**bases[run[0]], **futures}.items()}
        _side_outputs(lineage, records, run)
        summary = summarize(params, run, records, records["evaluate-dense"])
        allocation = read_json(Path(records["allocate"]["path"]) / "allocation.json")
        key = slug(summary["name"]).lower().replace("_", "-").replace(".", "-")
        create_markdown_artifact(
            key=f"allocation-{key}"[:60],
            markdown=render_table(allocation_rows(allocation)),
            description=f"Per-block allocation of {summary['name']}",
        )
        out.append((summary, records))
    return out


def run_grid(params: Params, grid: list[tuple[str, float, str]]) -> list[dict]:
    preflight(params.tracking.resolved_uri(params.output))
    lineage = dvc_lineage.plan(params, grid)
    dvc_lineage.warn_unrecorded(lineage)
    prefect_tags = lineage_tags()
    parent = start_parent(params, grid, prefect_tags)  # its DVC tags once committed
    try:
        runs = _summaries(params, grid, lineage)
        lineage = dvc_lineage.commit(lineage, dvc_lineage.grid_targets(grid))
        sweep_tags = dvc_lineage.sweep_tags(lineage)  # dvc.lock as the child runs see it
        summaries, sweep_files = publish(params, parent, runs, lineage, prefect_tags, _log_run)
        if grid == grid_of(params):  # the whole sweep: dvc.yaml's `track` stage is done too
            lineage = dvc_lineage.commit(lineage, [dvc_lineage.TRACK])
    except BaseException:
        with contextlib.suppress(Exception):  # the sweep's own error is the one to report
            end_sweep(parent, ok=False)
        raise
    files = [str(f) for f in sweep_files]
    end_sweep(parent, ok=True, files=files, tags=sweep_tags)
    create_markdown_artifact(
        key="evaluation-summary",
        markdown=results_table(summaries),
        description="cfsp evaluation summary",
    )
    return summaries


def _log_run(sweep: dict, record: dict) -> str:
    return track(sweep, record)


def _prune_dict(params: Params, model: str, budget: float, method: str) -> dict:
    return prune_config(params, method, budget).model_dump()


# Flow results are the summaries the CLI prints: returned in memory, never persisted (and, were
# they ever, as JSON: PREFECT_RESULTS_PERSIST_BY_DEFAULT=true would otherwise pickle them).
NOT_PERSISTED = dict(persist_result=False, result_serializer="json")


def _sweep_run_name() -> str:
    """`sweep-smollm2-135m`: a sweep's flow run is named like its MLflow parent run."""
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params")
    models = params.models if isinstance(params, Params) else (params or {}).get("models")
    return sweep_name(models) if isinstance(models, list) and models else "sweep"


def _compress_run_name() -> str:
    """`compress-smollm2-135m-p0.3-cfsp`: the flow run of one model, budget and method."""
    from prefect.runtime import flow_run

    given = flow_run.parameters
    try:
        return f"compress-{run_name(given['model'], given['method'], float(given['budget']))}"
    except (KeyError, TypeError, ValueError):
        return "compress"


@contextlib.contextmanager
def _runner_of(params: Params):
    """Submit this run's tasks through the runner `params.runner` asks for. A deployment's
    worker loads the flow with its decorator's runner and the parameters arrive only with the
    run, so the runner is entered here, inside the run, and put into the run's context (which
    `Task.submit` reads)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    with task_runner(params) as runner, context.model_copy(update={"task_runner": runner}):
        yield


def _log_to_prefect() -> None:
    """cfsp's own lines (per-block progress, timings) go to the run's logs in Prefect, wherever
    the run executes: logger `cfsp` gets Prefect's API handler (as PREFECT_LOGGING_EXTRA_LOGGERS
    =cfsp does at Prefect's start-up), and INFO where the process left it at WARNING (a worker's
    flow-run process does)."""
    from prefect.logging.handlers import APILogHandler

    from cfsp.logs import quiet_library_progress

    quiet_library_progress()  # no `Loading weights` bars in a worker's run either
    log = logging.getLogger("cfsp")
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in log.handlers):
        log.addHandler(APILogHandler())


@flow(
    name="sweep",
    flow_run_name=_sweep_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # replaced by params.runner in the run
    log_prints=True,
    **NOT_PERSISTED,
)
def sweep(params: Params) -> list[dict]:
    """Every model x budget x method of a params.yaml, sharing per-model stages."""
    _log_to_prefect()
    grid = grid_of(params)
    start = time.perf_counter()
    with _runner_of(params):
        out = run_grid(params, grid)
    logging.getLogger("cfsp").info(
        "sweep of %d runs took %.1fs", len(grid), time.perf_counter() - start
    )
    return out


@flow(
    name="compress",
    flow_run_name=_compress_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # replaced by params.runner in the run
    log_prints=True,
    **NOT_PERSISTED,
)
def compress(params: Params, model: str, budget: float, method: str) -> dict:
    """One model at one budget with one method."""
    _log_to_prefect()
    with _runner_of(params):
        return run_grid(params, [(model, budget, method)])[0]


def task_runner(params: Params):
    """The task runner params.yaml asks for: a thread pool, or Dask (local or remote cluster)."""
    if params.runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=params.runner.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        from cfsp.errors import UsageError

        raise UsageError("runner.kind=dask needs prefect-dask: pip install 'cfsp[dask]'") from err
    if params.runner.address:
        return DaskTaskRunner(address=params.runner.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 1,
            "threads_per_worker": params.runner.workers,
            "processes": False,
            # Loopback only: by default the dashboard (:8787) and the worker's server listen on
            # every interface, even with in-process workers. TCP on 127.0.0.1 binds them all
            # there; the dashboard gets a free port (its link is logged).
            "protocol": "tcp://",
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        }
    )


def check_request(params: Params) -> None:
    """The whole request, before Prefect starts: every spec, source, task, output, the task
    runner and the tracking backend (a usage error here costs seconds, not a half-run sweep)."""
    check_params(params)
    task_runner(params)  # built, not started: a missing prefect-dask is a usage error now
    preflight(params.tracking.resolved_uri(params.output))


def run_sweep(params: Params) -> list[dict]:
    """Check the request, then run the sweep flow (its tasks on params.runner)."""
    check_request(params)
    return sweep(params)
