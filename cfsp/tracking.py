"""MLflow tracking the way teams read it: one parent run per sweep, one child run per model x
budget x method x execution (a rerun is a new run with the same name, never an update of an old
one), every parameter section, lineage tags, dataset inputs and the checkpoint as a logged model.

Everything goes through `MlflowClient` with explicit run ids (no fluent "active run"): the sweep's
tasks run in threads, and a thread-local active run would attach one branch's metrics to another.
Against a tracking server (http/https) the experiment is created without an artifact location,
so the server assigns its own (`mlflow-artifacts:/...` with `--serve-artifacts`) and teammates
see the artifacts; only a local backend (sqlite, a folder) gets `<output>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cfsp import __version__
from cfsp.errors import CfspError, UsageError

log = logging.getLogger("cfsp.tracking")

# MLflow 3 opens an experiment without this tag in whichever view it infers; "custom model
# development" is its classic runs/models view (the other kind is "genai_development").
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
_LOCAL_SCHEMES = ("", "file", "sqlite")  # the client writes the artifacts itself


def _scheme(uri: str) -> str:
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    return "" if len(scheme) == 1 else scheme  # a Windows drive letter: a path


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can store runs at: a known scheme, and a sqlite URI that names a
    file (`sqlite:///` alone is an in-memory database: every run would be lost on exit)."""
    scheme = _scheme(uri)
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


@contextlib.contextmanager
def _reported(uri: str, what: str):
    """MLflow, database and connection errors as one CfspError naming the backend."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, OSError, SQLAlchemyError) as err:
        raise CfspError(
            f"MLflow tracking at {uri} {what}: {str(err)[:300]}; check "
            "MLFLOW_TRACKING_URI or tracking.uri in params.yaml"
        ) from err


def preflight(uri: str) -> None:
    """Fail before any work if the tracking backend cannot be reached (creating a sqlite
    database here, under the lock, so later steps find it made)."""
    import mlflow

    check_tracking_uri(uri)
    with _reported(uri, "is not reachable"), tracking_lock(uri):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def experiment_id(client, uri: str, name: str, artifact_root: str) -> str:
    """The experiment `name`, created if missing (under the sqlite lock: two sweeps must not
    both create it) and tagged as model development."""
    with tracking_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            local = _scheme(uri) in _LOCAL_SCHEMES
            location = Path(artifact_root).absolute().as_uri() if local else None
            exp_id = client.create_experiment(name, artifact_location=location)
            client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            return exp_id
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if _scheme(uri) not in _LOCAL_SCHEMES and exp.artifact_location.startswith("file:"):
        log.warning(
            "experiment %r on %s keeps its artifacts at %s, on one machine's disk: teammates "
            "will not see them; use a new tracking.experiment created through the server",
            name,
            uri,
            exp.artifact_location,
        )
    return exp.experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Who ran what: user, cfsp version, the git commit of the working directory (where
    params.yaml lives) and whether it had uncommitted changes."""
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {
        MLFLOW_USER: getpass.getuser(),
        MLFLOW_SOURCE_NAME: "cfsp",
        MLFLOW_SOURCE_TYPE: "LOCAL",
        "cfsp.version": __version__,
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def file_sha256(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "none"


def flatten(value, prefix: str = "") -> dict[str, str]:
    """Nested parameter sections as MLflow params: keys joined with `.`, values as text."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: str(value)[:MAX_PARAM_VAL_LENGTH]}


@dataclass(frozen=True)
class Sweep:
    """The parent run of one sweep, which every child run of the sweep points at."""

    uri: str
    experiment_id: str
    run_id: str
    start_ms: int


def start_sweep(
    uri: str, experiment: str, name: str, params: dict, artifact_root: str, tags: dict
) -> Sweep:
    """A new parent run (RUNNING) holding the whole request as params."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    with _reported(uri, "failed"):
        exp_id = experiment_id(client, uri, experiment, artifact_root)
        run = client.create_run(
            exp_id, run_name=name, tags={**source_tags(), "cfsp.kind": "sweep", **tags}
        )
        log_params(client, run.info.run_id, flatten(params))
    return Sweep(uri, exp_id, run.info.run_id, run.info.start_time)


def end_sweep(sweep: Sweep, ok: bool, files: list[str] = (), tags: dict | None = None) -> None:
    """Attach the sweep's report files (and tags known only at the end, such as its dvc.lock)
    to the parent run and close it FINISHED or FAILED."""
    import mlflow

    client = mlflow.MlflowClient(sweep.uri)
    with _reported(sweep.uri, "failed"):
        for key, value in (tags or {}).items():
            client.set_tag(sweep.run_id, key, value)
        for path in files:
            if Path(path).is_file():
                client.log_artifact(sweep.run_id, path, "sweep")
        client.set_terminated(sweep.run_id, "FINISHED" if ok else "FAILED")


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Params in MLflow's batches of at most 100."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for first in range(0, len(items), 100):
        client.log_batch(run_id, params=items[first : first + 100])


def log_metrics(client, run_id: str, metrics: dict, history: dict, model_id: str | None):
    """Final values (linked to the logged model when there is one) and per-step curves."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    points = [Metric(k, float(v), stamp, 0, model_id=model_id) for k, v in metrics.items()]
    for key, values in history.items():
        points += [Metric(key, float(v), stamp, i) for i, v in enumerate(values, start=1)]
    for first in range(0, len(points), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=points[first : first + 1000])


@dataclass(frozen=True)
class RunRecord:
    """One model x budget x method execution, as the flow hands it to tracking.

    params: nested sections (flattened with `.`); metrics: flat {name: value} (names may group
    with `/`); history: {metric: value per step}; artifacts: {folder in the run ("" = root):
    [files]}; calibration: the prepare fingerprint; evaluation: {source: fingerprint};
    checkpoint: {"path", "digest"}."""

    name: str
    params: dict
    metrics: dict
    tags: dict
    artifacts: dict
    history: dict | None = None
    calibration: dict | None = None
    evaluation: dict | None = None
    checkpoint: dict | None = None


def log_child(sweep: Sweep, record: RunRecord) -> str:
    """A new child run of `sweep` with everything in `record`, FINISHED; returns its run id.
    If logging fails half-way, the half-logged run is closed FAILED (a retry makes a new one)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from cfsp.tracking_io import checkpoint_tags, log_checkpoint, log_datasets

    client = mlflow.MlflowClient(sweep.uri)
    ckpt = checkpoint_tags(record.checkpoint) if record.checkpoint else {}
    tags = {**source_tags(), **record.tags, **ckpt, MLFLOW_PARENT_RUN_ID: sweep.run_id}
    params = flatten(record.params)
    with _reported(sweep.uri, "failed"):
        run = client.create_run(
            sweep.experiment_id, start_time=sweep.start_ms, tags=tags, run_name=record.name
        )
        run_id = run.info.run_id
        try:
            log_params(client, run_id, params)
            log_datasets(client, run_id, record.calibration, record.evaluation or {})
            model_id = None
            if record.checkpoint:
                model_id = log_checkpoint(
                    client, sweep.experiment_id, run_id, record.name, ckpt, params
                )
            log_metrics(client, run_id, record.metrics, record.history or {}, model_id)
            for folder, paths in record.artifacts.items():
                for path in paths:
                    if Path(path).is_file():
                        client.log_artifact(run_id, path, folder or None)
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    return run_id
