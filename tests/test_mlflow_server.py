"""cfsp's MLflow tracking against a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied
artifacts), read back over HTTP with MlflowClient: parent and child runs, reruns as new runs,
params, metrics grouped by `/`, tags, dataset inputs, the logged checkpoint and artifacts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cfsp.config import load_params, validate
from cfsp.interrupts import stop_group
from cfsp.io import sha256_file


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1, sqlite + an artifacts folder in tmp; stopped
    (its whole process group) at the end. Yields (url, artifacts folder)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--serve-artifacts", "--artifacts-destination", str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log = open(root / "server.log", "wb")  # noqa: SIM115 -- closed in the finalizer
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 240 s"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield url, root / "artifacts"
    finally:
        stop_group(proc)
        log.close()
    assert proc.poll() is not None


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_slash_metrics_and_reruns_through_the_library(mlflow_server, tmp_path):
    """Metric names grouped by `/` (values and per-step history) round-trip over HTTP; the same
    run name twice gives two runs; the experiment's artifacts live on the server."""
    import mlflow

    from cfsp.tracking import EXPERIMENT_KIND, RunRecord, end_sweep, log_child, start_sweep

    url, _ = mlflow_server
    client = mlflow.MlflowClient(tracking_uri=url)
    sweep = start_sweep(url, "lib", "sweep-x", {"budgets": [0.3]}, str(tmp_path / "unused"), {})
    record = RunRecord(
        name="x-p0.3-cfsp",
        params={"evaluate": {"limit": 4}, "budget": 0.3},
        metrics={"ppl/botchan_s128": 12.5, "speed/bf16/prefill_speedup": 1.25},
        tags={"budget": "0.3"},
        artifacts={},
        history={"recover/loss": [3.0, 2.0, 1.0]},
        checkpoint={"path": str(tmp_path), "digest": "0" * 20},
    )
    first, second = log_child(sweep, record), log_child(sweep, record)
    end_sweep(sweep, ok=True)
    assert first != second
    run = client.get_run(second)
    assert run.data.metrics == {
        "ppl/botchan_s128": 12.5,
        "speed/bf16/prefill_speedup": 1.25,
        "recover/loss": 1.0,  # a curve's last value
    }
    assert [m.value for m in client.get_metric_history(second, "recover/loss")] == [3, 2, 1]
    assert run.data.params["evaluate.limit"] == "4" and run.info.status == "FINISHED"
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "x-p0_3-cfsp" and model.tags["checkpoint.path"] == str(tmp_path)
    assert client.get_run(sweep.run_id).info.status == "FINISHED"
    exp = client.get_experiment(sweep.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    assert not (tmp_path / "unused").exists()


def _git_repo(path: Path) -> str:
    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    (path / ".gitignore").write_text("out/\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "tiny project")
    return git("rev-parse", "HEAD")


def _children(client, experiment_id: str, parent: str) -> dict:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
def test_sweep_logged_to_a_tracking_server(
    mlflow_server, prefect_server, tiny_project, monkeypatch, tmp_path
):
    import mlflow

    from flows.compress import run_sweep

    url, artifacts_root = mlflow_server
    commit = _git_repo(tiny_project)
    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    params = load_params("params.yaml")
    params = validate(type(params), {**params.model_dump(), "budgets": [0.3, 0.5]})
    first = run_sweep(params)
    # Rerun with one evaluation parameter changed (params.yaml edited: the tree is dirty).
    changed = {**params.model_dump(), "evaluate": {**params.evaluate.model_dump(), "limit": 3}}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    second = run_sweep(validate(type(params), changed))

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = [s[0]["mlflow_parent_run_id"] for s in (first, second)]
    old, new = (_children(client, exp.experiment_id, p) for p in parents)
    assert set(old) == set(new) == {"tiny-p0.3-cfsp", "tiny-p0.5-cfsp"}
    parent = client.get_run(parents[1])
    assert parent.info.run_name == "sweep-tiny" and parent.data.params["budgets"] == "[0.3, 0.5]"
    assert {a.path for a in client.list_artifacts(parents[1], "sweep")} >= {"sweep/report.html"}

    name = "tiny-p0.5-cfsp"
    before, after = old[name], new[name]
    assert before.info.run_id != after.info.run_id  # a rerun is a new run, the old one kept
    assert (before.data.params["evaluate.limit"], after.data.params["evaluate.limit"]) == ("4", "3")
    assert before.data.tags["prefect.flow_run_id"] != after.data.tags["prefect.flow_run_id"]
    for key in ("prepare.source", "capture.batch_size", "allocate.floor", "reconstruct.damping"):
        assert key in after.data.params
    for key in ("recover.enabled", "dtype", "tracking.experiment", "prune.criterion"):
        assert key in after.data.params
    assert after.data.params["budget"] == "0.5" and "budgets" not in after.data.params
    tags = after.data.tags
    assert (tags["model"], tags["budget"], tags["method"]) == ("tiny", "0.5", "cfsp")
    assert tags["mlflow.source.git.commit"] == commit
    assert (before.data.tags["git.dirty"], tags["git.dirty"]) == ("false", "true")
    assert "dvc.lock.sha256" in tags and tags["cfsp.version"]
    assert (
        after.data.metrics["params/count"]
        == next(s for s in second if s["name"] == name)["metrics"]["params/count"]
    )

    # Inputs: the calibration and evaluation windows, by their token-id hashes.
    summary = next(s for s in second if s["name"] == name)
    prepared = tiny_project / "out/dvc/tiny/prepare/prepare.json"
    evaluated = json.loads(Path(summary["files"][-1]).read_text())["perplexity"]
    inputs = {d.dataset.name: d for d in after.inputs.dataset_inputs}
    assert {k: v.dataset.digest for k, v in inputs.items()} == {
        "file:text.txt:calibration": json.loads(prepared.read_text())["fingerprint"]["hash"][:36],
        "file:text.txt:evaluation": evaluated["file:text.txt"]["fingerprint"]["hash"][:36],
    }
    contexts = {d.dataset.name: d.tags[0].value for d in after.inputs.dataset_inputs}
    assert contexts["file:text.txt:calibration"] == "calibration"
    # The checkpoint: tags on the run and an external logged model pointing at it.
    from cfsp.export import read_manifest
    from cfsp.pipeline.keys import digest

    assert tags["checkpoint.digest"] == digest(read_manifest(summary["checkpoint"])["files_sha256"])
    manifest = Path(summary["checkpoint"]) / "cfsp_manifest.json"
    assert tags["checkpoint.manifest_sha256"] == sha256_file(manifest)
    assert tags["checkpoint.path"] == str(Path(summary["checkpoint"]).absolute())
    [output] = after.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.tags["checkpoint.digest"] == tags["checkpoint.digest"]
    assert model.source_run_id == after.info.run_id

    # An artifact comes back byte-identical over HTTP, and it was stored by the server.
    assert after.info.artifact_uri.startswith("mlflow-artifacts:")
    got = Path(client.download_artifacts(after.info.run_id, "metrics.json", str(tmp_path)))
    written = Path(summary["files"][-1])
    assert written.name == "metrics.json" and got.read_bytes() == written.read_bytes()
    assert any(artifacts_root.rglob("metrics.json"))
