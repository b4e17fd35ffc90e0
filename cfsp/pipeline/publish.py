"""The final step of every sweep, whichever way it was started: run summaries from the stage
records of the one store, reports, and the MLflow parent run with one child run per
model x budget x method, tagged with the run's DVC lineage.

The Prefect flow calls it with its `track` task as `log`; dvc.yaml's `track` stage
(`cfsp stage track`) calls it with `tracking.log_child`, after reading the records from disk.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from cfsp.config import Params, prune_config
from cfsp.errors import UsageError
from cfsp.export import write_exports
from cfsp.io import read_json, write_json
from cfsp.pipeline.keys import run_name, sweep_name
from cfsp.pipeline.lineage import Lineage, run_tags, sweep_tags
from cfsp.pipeline.registry import STAGES, enabled
from cfsp.pipeline.store import load_record, stage_dir
from cfsp.report import run_summary, sweep_report, write_run_report
from cfsp.report_sweeps import sweep_protocol
from cfsp.tracking import RunRecord, Sweep, end_sweep, log_child, start_sweep

log = logging.getLogger("cfsp")
GRID = ("models", "budgets", "methods")  # one value each per child run: logged as model, ...


def grid_of(params: Params) -> list[tuple[str, float, str]]:
    return [(m, b, meth) for m in params.models for b in params.budgets for meth in params.methods]


def start_parent(params: Params, grid: list, tags: dict) -> Sweep:
    """The sweep's parent run: named after its models, holding the whole request."""
    return start_sweep(
        params.tracking.resolved_uri(params.output),
        params.tracking.experiment,
        sweep_name([g[0] for g in grid]),
        params.model_dump(),
        str(Path(params.output) / "mlartifacts"),
        tags,
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


def summarize(params: Params, run: tuple, records: dict, dense: dict) -> dict:
    """One run's summary (cfsp.report) from its stage records, with its exports written."""
    model, budget, method = run
    records = {s: r for s, r in records.items() if s != "evaluate-dense" and enabled(s, params)}
    summary = run_summary(run_name(model, method, budget), model, budget, method, records, dense)
    summary["exports"] = _exports(summary, params)
    return summary


def stored_records(params: Params, run: tuple) -> dict[str, dict]:
    """Every stage record of one run, read from the store (what `dvc repro` left there)."""
    model, budget, method = run
    out = {}
    for name, stage in STAGES.items():
        where = (budget, method) if stage.per_method else (None, None)
        record = load_record(stage_dir(params.output, name, model, *where))
        if record is None:
            folder = stage_dir(params.output, name, model, *where)
            raise UsageError(f"{folder} holds no stage record; run the pipeline first")
        out[name] = record
    return out


def _child(summary: dict, records: dict, params: Params, tags: dict) -> RunRecord:
    report = write_run_report(summary, Path(params.output) / "runs" / summary["name"])
    final = records.get("recover") if enabled("recover", params) else None
    final = final or records["reconstruct"]
    evaluated = read_json(Path(records["evaluate"]["path"]) / "metrics.json")
    model, budget, method = summary["model"], summary["budget"], summary["method"]
    return RunRecord(
        name=summary["name"],
        params={
            **{k: v for k, v in params.model_dump().items() if k not in GRID},
            **{"model": model, "budget": budget, "method": method},
            "prune": prune_config(params, method, budget).model_dump(),
        },
        metrics=summary["metrics"],
        tags={"model": model, "budget": f"{budget:g}", "method": method, **tags},
        artifacts={
            "": summary["files"] + summary.get("recover_files", []),
            "report": [str(f) for f in report],
        },
        history={"recover/loss": summary["recover_losses"]} if summary["recover_losses"] else None,
        calibration=records["prepare"]["info"],
        evaluation={s: r.get("fingerprint") for s, r in evaluated["perplexity"].items()},
        checkpoint={"path": final["path"], "digest": final["hash"]},
    )


def publish(params: Params, parent: Sweep, runs: list, lineage: Lineage, tags: dict, log_run):
    """Reports and one MLflow child run per (summary, records) in `runs`; `log_run(sweep,
    record)` logs one child (dicts) and returns its run id. Returns the summaries and the
    sweep's report files."""
    summaries = [summary for summary, _ in runs]
    protocol = sweep_protocol(params, parent)
    sweep_files = sweep_report(summaries, Path(params.output) / "report", protocol)
    report = str(next(f for f in sweep_files if f.name == "report.html"))
    for summary, records in runs:
        summary["sweep_report"], summary["mlflow_parent_run_id"] = report, parent.run_id
        healed = enabled("recover", params)
        where = (summary["model"], summary["budget"], summary["method"], healed)
        child_tags = {**tags, **run_tags(lineage, params.output, *where)}
        record = _child(summary, records, params, child_tags)
        summary["mlflow_run_id"] = log_run(asdict(parent), asdict(record))
        write_json(Path(params.output) / "runs" / summary["name"] / "summary.json", summary)
        log.info("%s: %s", summary["name"], {k: round(v, 4) for k, v in summary["metrics"].items()})
    return summaries, sweep_files


def track_stored(params: Params, lineage: Lineage) -> list[dict]:
    """dvc.yaml's `track` stage: the MLflow runs of the sweep in `params`, from the records
    DVC's stages left in the store and the dvc.lock entries it wrote for them."""
    from cfsp.pipeline.tracking import preflight

    grid = grid_of(params)
    stored = [(run, stored_records(params, run)) for run in grid]  # all there, before MLflow
    preflight(params.tracking.resolved_uri(params.output))
    tags = {"prefect.flow_run_id": "none"}
    parent = start_parent(params, grid, tags)
    try:
        runs = [(summarize(params, run, rec, rec["evaluate-dense"]), rec) for run, rec in stored]

        def log_run(sweep: dict, record: dict) -> str:
            return log_child(Sweep(**sweep), RunRecord(**record))

        summaries, files = publish(params, parent, runs, lineage, tags, log_run)
    except BaseException:
        end_sweep(parent, ok=False)
        raise
    end_sweep(parent, ok=True, files=[str(f) for f in files], tags=sweep_tags(lineage))
    return summaries
