"""The sweep report's memory and protocol: which sweeps produced its rows, and how.

Every sweep into the same output folder appends one entry to `<output>/report/sweeps.json`
({"protocol": {...}, "runs": [summary, ...]}); the report shows the newest result of every run
name over all sweeps, so a second sweep with other budgets adds rows instead of replacing the
table. Each entry's protocol says what the numbers mean (calibration size, evaluation windows,
code commit, checkpoint paths, MLflow and Prefect links), so rows from sweeps made differently
can be told apart. Plots only mix runs evaluated the same way as the newest sweep.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path

from cfsp import __version__
from cfsp.errors import CfspError
from cfsp.io import atomic_file, read_json

log = logging.getLogger("cfsp")

HISTORY = "sweeps.json"


def sweep_protocol(params, sweep=None) -> dict[str, str]:
    """How a sweep's numbers were made, as labelled lines. `params` is the sweep's Params,
    `sweep` its MLflow parent run (cfsp.tracking.Sweep) when it is tracked."""
    from cfsp.tracking import source_tags

    cal, ev = params.prepare, params.evaluate
    windows = f"first {ev.limit}" if ev.limit else "all"
    evaluation = (
        f"perplexity on {', '.join(ev.perplexity)}, {windows} windows of {ev.seqlen} tokens"
    )
    if ev.tasks:
        items = f"first {ev.task_limit}" if ev.task_limit else "all"
        evaluation += f"; zero-shot {', '.join(ev.tasks)} ({items} items each)"
    tags = source_tags()
    commit = tags.get("mlflow.source.git.commit", "unknown (not a git checkout)")
    if tags.get("git.dirty") == "true":
        commit += " with uncommitted changes"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "calibration": f"{cal.source}, {cal.nsamples} windows x {cal.seqlen} tokens, "
        f"seed {cal.seed}",
        "evaluation": evaluation,
        "code": f"cfsp {__version__}, commit {commit}",
        "mlflow": _mlflow_link(sweep) if sweep else "not tracked",
        "prefect": _prefect_link(),
    }


def _mlflow_link(sweep) -> str:
    page = f"#/experiments/{sweep.experiment_id}/runs/{sweep.run_id}"
    if sweep.uri.startswith(("http://", "https://")):
        return f"{sweep.uri.rstrip('/')}/{page}"
    return f"parent run {sweep.run_id} in {sweep.uri}; `cfsp dashboard`, then http://127.0.0.1:5000/{page}"


def _prefect_link() -> str:
    """The flow run's page on the Prefect server, when this runs inside a flow."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    if not flow_run.id:
        return "not run by Prefect"
    url = url_for("flow-run", obj_id=flow_run.id)
    return url or f"flow run {flow_run.id} on a temporary local server (no UI to link)"


def record_sweep(folder: Path, summaries: list[dict], protocol: dict | None) -> list[dict]:
    """Append this sweep to `folder`/sweeps.json (written atomically); all entries, oldest first.
    Each run keeps its checkpoint path in its summary."""
    path = folder / HISTORY
    history = _read_history(path)
    runs = [_absolute_checkpoint(s) for s in summaries]
    history.append({"protocol": protocol or {}, "runs": runs})
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(history, indent=1, default=str) + "\n")
    return history


def _absolute_checkpoint(summary: dict) -> dict:
    """The summary with its checkpoint path absolute (the report outlives the working folder)."""
    if "checkpoint" not in summary:
        return summary
    return dict(summary, checkpoint=str(Path(summary["checkpoint"]).absolute()))


def _read_history(path: Path) -> list[dict]:
    """The earlier sweeps; an unreadable history is set aside (renamed, with a warning) rather
    than failing a finished sweep at its last step."""
    if not path.exists():
        return []
    try:
        history = read_json(path, list)
        if all(isinstance(e, dict) and isinstance(e.get("runs"), list) for e in history):
            return history
        problem = "entries without a runs list"
    except CfspError as err:
        problem = str(err)
    aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
    path.replace(aside)
    log.warning("report history %s set aside as %s (%s); starting a new one", path, aside, problem)
    return []


def latest_runs(history: list[dict]) -> list[tuple[int, dict]]:
    """(sweep number from 1, summary): the newest summary of every run name, in first-seen
    order."""
    newest: dict[str, tuple[int, dict]] = {}
    for number, entry in enumerate(history, start=1):
        for summary in entry["runs"]:
            newest[summary["name"]] = (number, summary)
    return list(newest.values())


def protocol_section(history: list[dict]) -> str:
    """One markdown subsection per sweep, newest first: its protocol and checkpoint paths."""
    parts = ["## Protocol (newest sweep first)"]
    for number in range(len(history), 0, -1):
        entry = history[number - 1]
        lines = [f"- {key}: {value}" for key, value in entry["protocol"].items()]
        lines += [f"- checkpoint {s['name']}: {s.get('checkpoint', '?')}" for s in entry["runs"]]
        parts.append(f"### Sweep {number}\n\n" + "\n".join(lines))
    return "\n\n".join(parts)
