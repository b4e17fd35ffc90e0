"""The Prefect tasks, one per registered stage (cfsp.pipeline.registry), all built from one
function: run the stage, return a small JSON record (artifact folder, content hash, seconds).

Caching: the key is the task's inputs (model content key, the stage's declared parameter
sections, the run's pruning config, upstream records, the content-addressed output folder)
plus the task's source, never the run id; results are persisted as JSON (never pickle). A flow
passes `refresh_cache=True` when the folder a cached record points to has disappeared, so the
stage runs again instead of returning a dangling path.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cfsp.errors import UsageError
from cfsp.faults import kill_point
from cfsp.pipeline.keys import slug
from cfsp.pipeline.registry import STAGES, StageContext, content_hash, run_stage


def retry_unless_usage_error(task, task_run, state) -> bool:
    """Retry what may succeed on a second try (I/O, a busy machine), never a bad request."""
    return not isinstance(state.data, UsageError)


CACHED = dict(
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_usage_error,
)


def _run(
    stage: str,
    model: str,
    model_key: str,
    out: str,
    inputs: dict[str, dict] | None = None,
    sections: dict | None = None,
    prune: dict | None = None,
    reference: str | None = None,
) -> dict:
    """Run `stage`; `inputs` are the upstream tasks' records by stage name. `model_key` only
    keys the cache (a model spec's content)."""
    start = time.perf_counter()
    ctx = StageContext(
        model=model,
        out=Path(out),
        inputs={name: Path(record["path"]) for name, record in (inputs or {}).items()},
        sections=sections or {},
        prune=prune,
        reference=reference,
    )
    info = run_stage(stage, ctx)
    seconds = round(time.perf_counter() - start, 3)
    kill_point("CFSP_FAULT_KILL_AFTER_STAGE", Path(out).parent.name)  # tests only
    return {"path": out, "hash": content_hash(stage, Path(out)), "stage_s": seconds, "info": info}


def task_run_name(parameters: dict) -> str:
    """`prune-p0.3-cfsp` for a stage of one (budget, method) run, `prepare-smollm2-135m` for a
    stage of the model itself: what the Prefect UI lists instead of `prune-4f2`."""
    stage, prune, model = parameters["stage"], parameters.get("prune"), parameters["model"]
    if prune:
        return f"{stage}-p{prune['budget']:g}-{slug(prune['method'])}"
    return f"{stage}-{slug(Path(model).name or model)}"


TASKS = {name: task(name=name, task_run_name=task_run_name, **CACHED)(_run) for name in STAGES}
