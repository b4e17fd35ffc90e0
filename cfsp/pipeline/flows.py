"""Prefect flows: `sweep` over models x budgets x methods, and `compress` for one of each.

The flow only wires tasks together; every stage is a cached task that exchanges artifact
paths and content hashes. Artifacts live under `<output>/store/<stage>/<key>`, where the key is
a digest of everything upstream (model content key, parameter sections, method config), so the
same inputs always land in the same place and a rerun is served from cache.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from cfsp.config import Params, prune_config
from cfsp.io import read_json, write_json
from cfsp.preflight import check_params
from cfsp.report import results_table, run_report, sweep_report
from flows.keys import digest, model_key, run_name, slug
from tasks import stages as t
from tasks.track import preflight, track


def _submit(task_fn, out: Path, **kwargs):
    """Submit a cached stage; recompute when the artifact its cache record names is gone."""
    return task_fn.with_options(refresh_cache=not out.exists()).submit(out=str(out), **kwargs)


def _model_branch(params: Params, model: str, store: Path) -> dict:
    mk = model_key(model)
    prep_key = digest(mk, params.prepare.model_dump(), params.dtype)
    cap_key = digest(prep_key, params.capture.model_dump())
    tokens = _submit(
        t.prepare,
        store / "prepare" / prep_key,
        model=model,
        model_key=mk,
        calib=params.prepare.model_dump(),
        dtype=params.dtype,
    )
    stats = _submit(
        t.capture,
        store / "capture" / cap_key,
        model=model,
        model_key=mk,
        tokens=tokens,
        batch_size=params.capture.batch_size,
        dtype=params.dtype,
    )
    dense_eval = _submit(
        t.evaluate,
        store / "evaluate" / digest(mk, params.evaluate.model_dump()),
        model=model,
        model_hash=mk,
        evaluate=params.evaluate.model_dump(),
        dtype=params.dtype,
    )
    return {"key": mk, "cap_key": cap_key, "tokens": tokens, "stats": stats, "dense": dense_eval}


def _method_branch(
    params: Params, model: str, base: dict, budget: float, method: str, store: Path
) -> dict:
    cfg = prune_config(params, method, budget).model_dump()
    mk = base["key"]
    alloc_key = digest(base["cap_key"], cfg)
    rec_key = digest(alloc_key, "reconstruct")
    alloc = _submit(
        t.allocate,
        store / "allocate" / alloc_key,
        model=model,
        model_key=mk,
        stats=base["stats"],
        prune=cfg,
        dtype=params.dtype,
    )
    pruned = _submit(
        t.prune,
        store / "prune" / alloc_key,
        model=model,
        model_key=mk,
        stats=base["stats"],
        allocation=alloc,
        prune=cfg,
        dtype=params.dtype,
    )
    rec = _submit(
        t.reconstruct,
        store / "reconstruct" / rec_key,
        model=model,
        model_key=mk,
        pruned=pruned,
        stats=base["stats"],
        tokens=base["tokens"],
        prune=cfg,
        dtype=params.dtype,
    )
    final, final_key, healed = rec, rec_key, None
    if params.recover.enabled:
        final_key = digest(rec_key, params.recover.model_dump())
        healed = final = _submit(
            t.recover,
            store / "recover" / final_key,
            model_key=mk,
            checkpoint=rec,
            stats=base["stats"],
            recover=params.recover.model_dump(),
            allocate=params.allocate.model_dump(),
            dtype=params.dtype,
        )
    stage = "recover" if healed is not None else "reconstruct"
    ev = _submit(
        t.evaluate,
        store / "evaluate" / digest(final_key, params.evaluate.model_dump()),
        model=str(store / stage / final_key),
        model_hash=final,
        evaluate=params.evaluate.model_dump(),
        dtype=params.dtype,
        reference=model,
    )
    return {
        "model": model,
        "budget": budget,
        "method": method,
        "config": cfg,
        "alloc": alloc,
        "pruned": pruned,
        "rec": rec,
        "recover": healed,
        "eval": ev,
        "base": base,
    }


def _metrics(branch: dict, dense: dict, evaluation: dict, rec: dict, stats: dict) -> dict:
    """Flat MLflow metrics: quality and size, each also as a ratio to dense, stage timings."""
    ours, base = evaluation["metrics"], dense["metrics"]
    out = {
        "params": ours["params"],
        "params_ratio": ours["params"] / base["params"],
        "achieved_fraction": rec["achieved_fraction"],
        "capture_s": stats["wall_s"],
    }
    for source, ppl in ours["ppl"].items():
        name = f"ppl_{slug(source)}_s{ours['seqlen']}"
        out[name] = ppl
        out[f"{name}_ratio"] = ppl / base["ppl"][source]
    for dtype, row in ours.get("speed", {}).items():
        tag = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
        for key, value in row.items():
            out[f"{key}_{tag}"] = value
    for task_name, acc in ours.get("acc", {}).items():
        out[f"acc_{task_name}"] = acc
        if base.get("acc", {}).get(task_name):
            out[f"acc_{task_name}_ratio"] = acc / base["acc"][task_name]
    stage_records = {
        "prepare": branch["base"]["tokens"],
        "capture": branch["base"]["stats"],
        "allocate": branch["alloc"],
        "prune": branch["pruned"],
        "reconstruct": branch["rec"],
        "recover": branch["recover"],
        "evaluate": branch["eval"],
    }
    for stage, future in stage_records.items():
        if future is not None:
            out[f"time_{stage}_s"] = future.result().get("stage_s", 0.0)
    if branch["recover"] is not None:
        healed = branch["recover"].result()
        out["recover_trainable_params"] = healed["trainable_params"]
        out["recover_final_loss"] = healed["losses"][-1]
    return out


def _summarize(branch: dict) -> dict:
    """The run's metrics and where its artifacts are; Prefect table of its allocation."""
    alloc, rec = branch["alloc"].result(), branch["rec"].result()
    evaluation, dense = branch["eval"].result(), branch["base"]["dense"].result()
    name = run_name(branch["model"], branch["method"], branch["budget"])
    allocation = read_json(Path(alloc["path"]) / "allocation.json")
    create_table_artifact(
        key=f"allocation-{slug(name).lower().replace('_', '-').replace('.', '-')}"[:60],
        table=[
            {"block": i, "keep": round(k, 4), **w}
            for i, (k, w) in enumerate(
                zip(allocation["keep_ratios"], allocation["widths"], strict=True)
            )
        ],
        description=f"Per-block allocation of {name}",
    )
    healed = branch["recover"].result() if branch["recover"] is not None else {}
    return {
        "recover_losses": healed.get("losses", []),
        "recover_files": [str(Path(healed["path"]) / "recover_loss.png")] if healed else [],
        "name": name,
        "model": branch["model"],
        "budget": branch["budget"],
        "method": branch["method"],
        "checkpoint": (branch["recover"] or branch["rec"]).result()["path"],
        "metrics": _metrics(branch, dense, evaluation, rec, branch["base"]["stats"].result()),
        "seqlen": evaluation["metrics"]["seqlen"],
        "dense_ppl": dense["metrics"]["ppl"],
        "ppl": evaluation["metrics"]["ppl"],
        "keep_ratios": allocation["keep_ratios"],
        "allocation_plot": str(Path(alloc["path"]) / "allocation.png"),
        "files": [
            str(Path(alloc["path"]) / "allocation.json"),
            str(Path(alloc["path"]) / "allocation.png"),
            str(Path(rec["path"]) / "cfsp_manifest.json"),
            str(Path(evaluation["path"]) / "metrics.json"),
        ],
    }


def _track(summary: dict, branch: dict, params: Params, uri: str, sweep_files: list) -> dict:
    """Per-run report next to the run's summary, then the MLflow run with everything attached."""
    folder = Path(params.output) / "runs" / summary["name"]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["allocation_plot"], folder / "allocation.png")
    report = run_report(summary, folder) + [folder / "allocation.png"]
    summary["report"] = str(folder / "report.html")
    summary["sweep_report"] = str(next(f for f in sweep_files if f.name == "report.html"))
    summary["mlflow_run_id"] = track(
        summary["name"],
        uri,
        params.tracking.experiment,
        {
            "model": branch["model"],
            "budget": branch["budget"],
            "method": branch["method"],
            "prune": branch["config"],
            "prepare": params.prepare.model_dump(),
            "evaluate": params.evaluate.model_dump(),
        },
        summary["metrics"],
        {
            "": summary["files"] + summary.get("recover_files", []),
            "report": [str(f) for f in report],
            "sweep": [str(f) for f in sweep_files],
        },
        str(Path(params.output) / "mlartifacts"),
        {"recover_loss": summary["recover_losses"]} if summary.get("recover_losses") else None,
    )
    write_json(folder / "summary.json", summary)
    get_run_logger().info(
        "%s: %s", summary["name"], {k: round(v, 4) for k, v in summary["metrics"].items()}
    )
    return summary


def run_grid(params: Params, grid: list[tuple[str, float, str]]) -> list[dict]:
    store = Path(params.output) / "store"
    uri = params.tracking.resolved_uri(params.output)
    preflight(uri)
    bases = {m: _model_branch(params, m, store) for m in dict.fromkeys(g[0] for g in grid)}
    branches = [_method_branch(params, m, bases[m], b, meth, store) for m, b, meth in grid]
    summaries = [_summarize(branch) for branch in branches]
    sweep_files = sweep_report(summaries, Path(params.output) / "report")
    summaries = [
        _track(s, b, params, uri, sweep_files) for s, b in zip(summaries, branches, strict=True)
    ]
    create_markdown_artifact(
        key="evaluation-summary",
        markdown=results_table(summaries),
        description="cfsp evaluation summary",
    )
    return summaries


# Flow results are the summaries the CLI prints: returned in memory, never persisted (and, were
# they ever, as JSON: PREFECT_RESULTS_PERSIST_BY_DEFAULT=true would otherwise pickle them).
NOT_PERSISTED = dict(persist_result=False, result_serializer="json")


@flow(
    name="sweep",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    log_prints=True,
    **NOT_PERSISTED,
)
def sweep(params: dict) -> list[dict]:
    """Every model x budget x method of a params.yaml, sharing per-model stages."""
    p = Params(**params)
    grid = [(m, b, meth) for m in p.models for b in p.budgets for meth in p.methods]
    start = time.perf_counter()
    out = run_grid(p, grid)
    logging.getLogger("cfsp").info(
        "sweep of %d runs took %.1fs", len(grid), time.perf_counter() - start
    )
    return out


@flow(
    name="compress",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
    log_prints=True,
    **NOT_PERSISTED,
)
def compress(params: dict, model: str, budget: float, method: str) -> dict:
    """One model at one budget with one method."""
    return run_grid(Params(**params), [(model, budget, method)])[0]


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
    """The whole request, before Prefect starts: every spec, source, task, output and the
    tracking backend (a usage error here costs seconds, not a half-run sweep)."""
    check_params(params)
    preflight(params.tracking.resolved_uri(params.output))


def run_sweep(params: Params) -> list[dict]:
    """Check the request, then run the sweep flow with the configured task runner."""
    check_request(params)
    return sweep.with_options(task_runner=task_runner(params))(params.model_dump())


def deploy_sweep(params: Params, name: str, cron: str):
    """A deployment of the sweep on a cron schedule (served by `cfsp serve`)."""
    return sweep.to_deployment(name=name, cron=cron, parameters={"params": params.model_dump()})
