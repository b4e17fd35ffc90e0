"""The Prefect tasks, one per registered stage (cfsp.pipeline.registry), all built from one
function: run the stage into its folder of the one store (cfsp.pipeline.store), return its small
JSON record (artifact folder, content hash, seconds, the stage's result).

Caching is the store's, not Prefect's: a stage whose folder holds a record of the same key with
matching content is not run again (`store.run_recorded`, shared with `cfsp stage` and so with
`dvc repro`). Prefect keeps no result cache of its own (a cached Prefect record could name a
folder that DVC or a later run has since replaced) and persists nothing (never pickle).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cfsp.errors import UsageError
from cfsp.pipeline.keys import slug
from cfsp.pipeline.registry import STAGES, StageContext
from cfsp.pipeline.store import run_recorded


def retry_unless_usage_error(task, task_run, state) -> bool:
    """Retry what may succeed on a second try (I/O, a busy machine), never a bad request."""
    return not isinstance(state.data, UsageError)


STAGE_TASK = dict(
    cache_policy=NO_CACHE,
    persist_result=False,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_usage_error,
)


def _run(
    stage: str,
    model: str,
    out: str,
    inputs: dict[str, dict] | None = None,
    sections: dict | None = None,
    prune: dict | None = None,
    reference: str | None = None,
) -> dict:
    """Run `stage` (or reuse its fresh record); `inputs` are the upstream tasks' records by
    stage name."""
    ctx = StageContext(
        model=model,
        out=Path(out),
        inputs={name: Path(record["path"]) for name, record in (inputs or {}).items()},
        sections=sections or {},
        prune=prune,
        reference=reference,
    )
    return run_recorded(stage, ctx)


def task_run_name(parameters: dict) -> str:
    """`prune-p0.3-cfsp` for a stage of one (budget, method) run, `prepare-smollm2-135m` for a
    stage of the model itself: what the Prefect UI lists instead of `prune-4f2`."""
    stage, prune, model = parameters["stage"], parameters.get("prune"), parameters["model"]
    if prune:
        return f"{stage}-p{prune['budget']:g}-{slug(prune['method'])}"
    return f"{stage}-{slug(Path(model).name or model)}"


TASKS = {name: task(name=name, task_run_name=task_run_name, **STAGE_TASK)(_run) for name in STAGES}
