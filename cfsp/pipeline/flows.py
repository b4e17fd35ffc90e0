"""Prefect flows: `sweep` over models x budgets x methods, and `compress` for one of each.

The flow only wires the registered stages (cfsp.pipeline.registry) together; every stage is a
cached task that exchanges artifact paths and content hashes. Artifacts live under
`<output>/store/<stage>/<key>`, where the key (`registry.cache_key`) is a digest of everything
upstream (model content key, declared parameter sections, the run's pruning config), so the
same inputs always land in the same place and a rerun is served from cache. Summaries, metric
names and reports come from the library (cfsp.report, cfsp.metrics).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from cfsp.config import Params, prune_config
from cfsp.export import write_exports
from cfsp.io import read_json, write_json
from cfsp.metrics import render_table
from cfsp.pipeline.keys import model_key, run_name, slug, sweep_name
from cfsp.pipeline.registry import STAGES, cache_key, enabled, sections
from cfsp.pipeline.tasks import TASKS
from cfsp.pipeline.tracking import lineage_tags, preflight, track
from cfsp.preflight import check_params
from cfsp.report import allocation_rows, results_table, run_summary, sweep_report, write_run_report
from cfsp.report_sweeps import sweep_protocol
from cfsp.tracking import RunRecord, Sweep, end_sweep, start_sweep


def _submit(stage: str, store: Path, key: str, **kwargs):
    """Submit a cached stage; recompute when the artifact its cache record names is gone."""
    out = store / stage / key
    task_fn = TASKS[stage].with_options(refresh_cache=not out.exists())
    return task_fn.submit(stage=stage, out=str(out), **kwargs)


def _branch(params: Params, model: str, store: Path, mk: str, done: dict, prune=None) -> dict:
    """Submit every registered stage of one model (prune=None) or of one (budget, method) run
    on top of the model's own stages (`done`: {stage: (key, future)}), in registry order."""
    per_method = prune is not None
    out = {}
    for name, stage in STAGES.items():
        if stage.per_method != per_method:
            continue
        seen = {**done, **out}
        if not enabled(name, params):
            out[name] = seen[stage.inputs[-1]]  # a disabled stage passes its input on
            continue
        upstream = [seen[i][0] for i in stage.inputs] or [mk]
        key = cache_key(name, upstream, params, prune)
        future = _submit(
            name,
            store,
            key,
            model=model,
            model_key=mk,
            inputs={i: seen[i][1] for i in stage.inputs},
            sections=sections(name, params),
            prune=prune,
            reference=model if per_method and name.startswith("evaluate") else None,
        )
        out[name] = (key, future)
    return out


def _records(params: Params, futures: dict) -> dict[str, dict]:
    """The stage records of one run; the recover record only when it ran."""
    return {
        name: future.result()
        for name, (_, future) in futures.items()
        if name in STAGES and enabled(name, params)
    }


def _track(summary: dict, records: dict, params: Params, sweep: dict) -> dict:
    """Per-run report next to the run's summary, then a new MLflow child run of the sweep."""
    folder = Path(params.output) / "runs" / summary["name"]
    report = write_run_report(summary, folder)
    final = records.get("recover") or records["reconstruct"]
    evaluated = read_json(Path(records["evaluate"]["path"]) / "metrics.json")
    model, budget, method = summary["model"], summary["budget"], summary["method"]
    record = RunRecord(
        name=summary["name"],
        params={
            **{k: v for k, v in params.model_dump().items() if k not in GRID},
            **{"model": model, "budget": budget, "method": method},
            "prune": prune_config(params, method, budget).model_dump(),
        },
        metrics=summary["metrics"],
        tags={"model": model, "budget": f"{budget:g}", "method": method, **lineage_tags()},
        artifacts={
            "": summary["files"] + summary.get("recover_files", []),
            "report": [str(f) for f in report],
        },
        history={"recover/loss": summary["recover_losses"]} if summary["recover_losses"] else None,
        calibration=records["prepare"]["info"],
        evaluation={s: r.get("fingerprint") for s, r in evaluated["perplexity"].items()},
        checkpoint={"path": final["path"], "digest": final["hash"]},
    )
    summary["mlflow_run_id"] = track(sweep, asdict(record))
    write_json(folder / "summary.json", summary)
    get_run_logger().info(
        "%s: %s", summary["name"], {k: round(v, 4) for k, v in summary["metrics"].items()}
    )
    return summary


GRID = ("models", "budgets", "methods")  # one value each per child run: logged as model, ...


def _start_sweep(params: Params, grid: list[tuple[str, float, str]]) -> Sweep:
    """The sweep's parent run: named after its models, holding the whole request."""
    return start_sweep(
        params.tracking.resolved_uri(params.output),
        params.tracking.experiment,
        sweep_name([g[0] for g in grid]),
        params.model_dump(),
        str(Path(params.output) / "mlartifacts"),
        lineage_tags(),
    )


def _exports(summary: dict, params: Params) -> dict:
    """The export kinds asked for besides compact, written beside the run's checkpoint; their
    model cards state the quality measured here."""
    quality = {
        "perplexity (pruned)": summary["ppl"],
        "perplexity (dense)": summary["dense_ppl"],
        "evaluation": f"{params.evaluate.perplexity}, windows of {params.evaluate.seqlen} tokens",
    }
    return write_exports(summary["checkpoint"], params.export.kinds, params.dtype, quality=quality)


def _summaries(params: Params, grid: list[tuple[str, float, str]], store: Path) -> list:
    """Submit every stage of the grid; (summary, stage records) of each run, in grid order."""
    keys = {m: model_key(m) for m in dict.fromkeys(g[0] for g in grid)}
    bases = {m: _branch(params, m, store, keys[m], {}) for m in keys}
    runs = [
        (m, b, meth, _branch(params, m, store, keys[m], bases[m], _prune_dict(params, meth, b)))
        for m, b, meth in grid
    ]
    out = []
    for model, budget, method, futures in runs:
        name = run_name(model, method, budget)
        records = _records(params, {**bases[model], **futures})
        records.pop("evaluate-dense")
        dense = bases[model]["evaluate-dense"][1].result()
        summary = run_summary(name, model, budget, method, records, dense)
        summary["exports"] = _exports(summary, params)
        allocation = read_json(Path(records["allocate"]["path"]) / "allocation.json")
        create_markdown_artifact(
            key=f"allocation-{slug(name).lower().replace('_', '-').replace('.', '-')}"[:60],
            markdown=render_table(allocation_rows(allocation)),
            description=f"Per-block allocation of {name}",
        )
        out.append((summary, records))
    return out


def run_grid(params: Params, grid: list[tuple[str, float, str]]) -> list[dict]:
    store = Path(params.output) / "store"
    preflight(params.tracking.resolved_uri(params.output))
    parent = _start_sweep(params, grid)
    summaries, sweep_files = [], []
    try:
        runs = _summaries(params, grid, store)
        summaries = [summary for summary, _ in runs]
        protocol = sweep_protocol(params, parent)
        sweep_files = sweep_report(summaries, Path(params.output) / "report", protocol)
        report = str(next(f for f in sweep_files if f.name == "report.html"))
        for s in summaries:
            s["sweep_report"], s["mlflow_parent_run_id"] = report, parent.run_id
        summaries = [_track(s, records, params, asdict(parent)) for s, records in runs]
    except BaseException:
        with contextlib.suppress(Exception):  # the sweep's own error is the one to report
            end_sweep(parent, ok=False)
        raise
    end_sweep(parent, ok=True, files=[str(f) for f in sweep_files])
    create_markdown_artifact(
        key="evaluation-summary",
        markdown=results_table(summaries),
        description="cfsp evaluation summary",
    )
    return summaries


def _prune_dict(params: Params, method: str, budget: float) -> dict:
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
    grid = [(m, b, meth) for m in params.models for b in params.budgets for meth in params.methods]
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
