"""cfsp.tracking on a local sqlite backend (no server, seconds): parameter flattening, where a
local experiment keeps its artifacts, and runs closed FAILED when a sweep or a child fails."""

from __future__ import annotations

import pytest

from cfsp.tracking import (
    EXPERIMENT_KIND,
    RunRecord,
    end_sweep,
    flatten,
    log_child,
    source_tags,
    start_sweep,
)


def test_flatten_joins_sections_with_dots():
    nested = {"evaluate": {"limit": 4, "speed": {"dtypes": ["float32"]}}, "dtype": "float32"}
    assert flatten(nested) == {
        "evaluate.limit": "4",
        "evaluate.speed.dtypes": "['float32']",
        "dtype": "float32",
    }


def test_source_tags_outside_a_git_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    tags = source_tags()
    assert tags["git.dirty"] == "unknown" and "mlflow.source.git.commit" not in tags


def _record(**changes) -> RunRecord:
    base = dict(name="m-p0.3-cfsp", params={"budget": 0.3}, metrics={"params": 10.0}, tags={})
    return RunRecord(**{**base, "artifacts": {}, **changes})


def test_local_experiment_failed_child_and_failed_sweep(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    sweep = start_sweep(uri, "local", "sweep-m", {"budgets": [0.3]}, str(tmp_path / "art"), {})
    exp = client.get_experiment(sweep.experiment_id)
    assert exp.artifact_location == (tmp_path / "art").absolute().as_uri()
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]

    (tmp_path / "a.json").write_text("{}")
    ok = log_child(sweep, _record(artifacts={"sub": [str(tmp_path / "a.json")]}))
    assert [a.path for a in client.list_artifacts(ok, "sub")] == ["sub/a.json"]
    with pytest.raises(ValueError):  # a metric that is not a number, half-way through logging
        log_child(sweep, _record(metrics={"params": "many"}))
    end_sweep(sweep, ok=False)
    runs = client.search_runs([sweep.experiment_id])
    status = {(r.info.run_id == ok, r.info.run_id == sweep.run_id): r.info.status for r in runs}
    assert status == {(True, False): "FINISHED", (False, False): "FAILED", (False, True): "FAILED"}
    children = [r for r in runs if r.info.run_id != sweep.run_id]
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [sweep.run_id] * 2
