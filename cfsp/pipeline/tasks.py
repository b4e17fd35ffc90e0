"""One Prefect task per stage. Each calls the library function in cfsp.stages and returns a
small JSON record (the artifact path and a content hash) for the next task's inputs.

Caching: the key is the task's inputs (specs, parameter sections, upstream content hashes,
the content-addressed output path) plus the task's source, never the run id; results are
persisted as JSON (never pickle). A flow passes `refresh_cache=True` when the artifact a cached
record points to has disappeared, so the stage runs again instead of returning a dangling path.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cfsp import stages
from cfsp.config import CalibConfig, EvalConfig, PruneConfig, RecoverConfig
from cfsp.errors import UsageError
from cfsp.faults import kill_point
from cfsp.io import sha256_file


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


def _record(out: str, artifact: str, start: float, **extra) -> dict:
    """What the next task needs: the artifact, its content hash, and how long the stage took."""
    seconds = round(time.perf_counter() - start, 3)
    kill_point("CFSP_FAULT_KILL_AFTER_STAGE", Path(out).parent.name)  # tests only
    return {"path": out, "hash": sha256_file(Path(out) / artifact), "stage_s": seconds, **extra}


@task(name="prepare", **CACHED)
def prepare(model: str, model_key: str, calib: dict, dtype: str, out: str) -> dict:
    start = time.perf_counter()
    fingerprint = stages.prepare(model, CalibConfig(**calib), Path(out), dtype)
    return _record(out, stages.TOKENS, start, fingerprint=fingerprint)


@task(name="capture", **CACHED)
def capture(
    model: str, model_key: str, tokens: dict, batch_size: int, dtype: str, out: str
) -> dict:
    start = time.perf_counter()
    info = stages.capture_stage(model, Path(tokens["path"]), Path(out), batch_size, dtype)
    return _record(out, stages.STATS, start, wall_s=info["wall_s"])


@task(name="allocate", **CACHED)
def allocate(model: str, model_key: str, stats: dict, prune: dict, dtype: str, out: str) -> dict:
    start = time.perf_counter()
    info = stages.allocate_stage(model, Path(stats["path"]), PruneConfig(**prune), Path(out), dtype)
    return _record(out, stages.ALLOCATION, start, keep_ratios=info["keep_ratios"])


@task(name="prune", **CACHED)
def prune(
    model: str, model_key: str, stats: dict, allocation: dict, prune: dict, dtype: str, out: str
) -> dict:
    start = time.perf_counter()
    info = stages.prune_stage(
        model, Path(stats["path"]), Path(allocation["path"]), PruneConfig(**prune), Path(out), dtype
    )
    return _record(out, "model.safetensors", start, **info)


@task(name="reconstruct", **CACHED)
def reconstruct(
    model: str,
    model_key: str,
    pruned: dict,
    stats: dict,
    tokens: dict,
    prune: dict,
    dtype: str,
    out: str,
) -> dict:
    start = time.perf_counter()
    info = stages.reconstruct_stage(
        model,
        Path(pruned["path"]),
        Path(stats["path"]),
        PruneConfig(**prune),
        Path(out),
        Path(tokens["path"]),
        dtype,
    )
    return _record(out, "model.safetensors", start, **info)


@task(name="recover", **CACHED)
def recover(
    model_key: str,
    checkpoint: dict,
    stats: dict,
    recover: dict,
    allocate: dict,
    dtype: str,
    out: str,
) -> dict:
    start = time.perf_counter()
    info = stages.recover_stage(
        Path(checkpoint["path"]),
        Path(stats["path"]),
        RecoverConfig(**recover),
        Path(out),
        dtype,
        allocate["temperature"],
        allocate["control"],
    )
    return _record(out, "model.safetensors", start, **info)


@task(name="evaluate", **CACHED)
def evaluate(
    model: str,
    model_hash: str,
    evaluate: dict,
    dtype: str,
    out: str,
    reference: str | None = None,
) -> dict:
    start = time.perf_counter()
    metrics = stages.evaluate_stage(model, EvalConfig(**evaluate), Path(out), dtype, reference)
    return _record(out, stages.METRICS, start, metrics=stages.compact_metrics(metrics))
