"""MLflow tracking: one run per (model, budget, method), found again by name on reruns."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from prefect import task

from cfsp import __version__
from cfsp.errors import CfspError, UsageError
from cfsp.pipeline.tasks import retry_unless_usage_error


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def _file_hash(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "none"


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can store runs at: a known scheme, and a sqlite URI that names a
    file (`sqlite:///` alone is an in-memory database: every run would be lost on exit)."""
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    if scheme not in _SCHEMES:
        raise UsageError(
            f"MLflow tracking URI {uri!r} has an unknown scheme {scheme!r}; use sqlite:///PATH, "
            "http(s)://HOST:PORT or a database URL (MLFLOW_TRACKING_URI or tracking.uri)"
        )
    if scheme == "sqlite" and _sqlite_path(uri) is None:
        raise UsageError(
            f"MLflow tracking URI {uri!r} names no database file; use sqlite:///PATH/mlflow.db"
        )


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for in-memory ones)."""
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def tracking_lock(uri: str):
    """Serialize creating a sqlite tracking database and its experiment: two runs starting
    together in a fresh folder otherwise race through MLflow's schema migrations, and one
    fails ("Online migration expected to match one row"). Other backends: no lock."""
    path = _sqlite_path(uri) if uri.startswith("sqlite") else None
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=600):
        yield


def preflight(uri: str) -> None:
    """Fail before any work if the tracking backend cannot be reached (creating a sqlite
    database here, under the lock, so later steps find it made)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    check_tracking_uri(uri)
    try:
        with tracking_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except (MlflowException, OSError, SQLAlchemyError) as err:
        raise CfspError(
            f"MLflow tracking at {uri} is not reachable: {str(err)[:300]}; check "
            "MLFLOW_TRACKING_URI or tracking.uri in params.yaml"
        ) from err


@task(
    name="track",
    persist_result=False,  # a side effect, not a cacheable result; never pickled either
    result_serializer="json",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=retry_unless_usage_error,
)
def track(
    name: str,
    uri: str,
    experiment: str,
    params: dict,
    metrics: dict,
    artifacts: dict[str, list[str]],
    artifact_root: str,
    history: dict[str, list[float]] | None = None,
) -> str:
    """Create or update the MLflow run `name`; returns its run id.

    artifacts: {folder in the run ("" for its root): [files]}; history: {metric: value per step}.
    """
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from prefect.runtime import flow_run

    mlflow.set_tracking_uri(uri)
    try:
        with tracking_lock(uri):  # two runs must not both create the experiment
            exp = mlflow.get_experiment_by_name(experiment)
            exp_id = (
                exp.experiment_id
                if exp
                else mlflow.create_experiment(
                    experiment, artifact_location=Path(artifact_root).absolute().as_uri()
                )
            )
        found = mlflow.search_runs(
            [exp_id],
            filter_string=f"tags.`mlflow.runName` = '{name}'",
            max_results=1,
            output_format="list",
        )
    except (MlflowException, OSError) as err:
        raise CfspError(
            f"MLflow tracking at {uri} failed: {err}; check MLFLOW_TRACKING_URI "
            "or tracking.uri in params.yaml"
        ) from err
    flat: dict = {}
    _flatten("", params, flat)
    tags = {
        "cfsp.version": __version__,
        "git.commit": _git_commit(),
        "dvc.lock.sha256": _file_hash("dvc.lock"),
        "prefect.flow_run_id": str(flow_run.get_id() or "none"),
    }
    with mlflow.start_run(
        run_id=found[0].info.run_id if found else None, run_name=name, experiment_id=exp_id
    ) as run:
        if not found:
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.set_tags(tags)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        client = mlflow.MlflowClient(uri)
        stamp = int(time.time() * 1000)
        for key, values in (history or {}).items():
            points = [Metric(key, float(v), stamp, i) for i, v in enumerate(values, start=1)]
            for first in range(0, len(points), 1000):  # MLflow's batch limit
                client.log_batch(run.info.run_id, metrics=points[first : first + 1000])
        for folder, paths in artifacts.items():
            for path in paths:
                if Path(path).is_file():
                    mlflow.log_artifact(path, artifact_path=folder or None)
        return run.info.run_id
