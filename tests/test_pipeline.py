"""The pipeline for real: Prefect's temporary server, sqlite MLflow, a git + DVC repository."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cfsp.config import RecoverConfig, load_params, validate
from cfsp.export import read_manifest, verify_checkpoint
from cfsp.io import sha256_file


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _mtimes(root: Path, stage: str) -> dict:
    """When each file of `stage`'s folder in the store (tiny, budget 0.4, cfsp) was written."""
    from cfsp.pipeline.store import stage_dir

    folder = stage_dir(root / "out", stage, "tiny", 0.4, "cfsp")
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_flow_artifacts_tracking_and_cache(tiny_project, prefect_server, monkeypatch):
    import mlflow

    from flows.compress import run_sweep

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params("params.yaml")
    [summary] = run_sweep(params)
    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "model.safetensors").is_file()
    assert verify_checkpoint(checkpoint) == []  # its stage record is not a checkpoint file
    assert Path(summary["allocation_plot"]).stat().st_size > 1000
    assert abs(summary["metrics"]["params/removed_fraction"] - 0.4) < 0.1
    assert summary["metrics"]["ppl/file-text.txt_s16"] > 1

    # The MLflow run, read back through the client.
    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'out/mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "tiny-p0.4-cfsp"
    assert run.data.params["budget"] == "0.4" and run.data.params["prune.criterion"] == "cfsp"
    assert "ppl/file-text.txt_s16_ratio" in run.data.metrics
    for tag in ("fp32", "bf16"):  # speed against the dense model, measured in the same process
        assert run.data.metrics[f"speed/ideal_{tag}"] > 1
        assert 0 < run.data.metrics[f"speed/memory_{tag}"] < 1
        assert run.data.metrics[f"speed/prefill_{tag}"] > 0
    for stage in ("prepare", "capture", "allocate", "prune", "reconstruct", "evaluate"):
        assert run.data.metrics[f"time/{stage}_s"] > 0
    assert set(run.data.metrics) == set(summary["metrics"])  # the one schema, cfsp.metrics
    for tag in ("git.dirty", "dvc.lock.sha256", "prefect.flow_run_id", "cfsp.version", "budget"):
        assert tag in run.data.tags
    assert run.data.tags["prefect.flow_run_id"] != "none"
    # Not a DVC project: the same folders, nothing committed, and the tags say why.
    assert (
        run.data.tags["dvc.lineage"].startswith("none (")
        and "not a DVC project" in (run.data.tags["dvc.lineage"])
    )
    assert run.data.tags["dvc.checkpoint.md5"] == "none"
    assert checkpoint.absolute() == tiny_project / "out/dvc/tiny/cfsp-p0.4/reconstructed"
    assert not (tiny_project / "out/store").exists() and not (tiny_project / "metrics").exists()
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"allocation.png", "cfsp_manifest.json", "metrics.json"} <= names

    # A rerun reuses every stage record: no artifact is rewritten; a new MLflow run, same name.
    before = {s: _mtimes(tiny_project, s) for s in ("prepare", "capture", "reconstruct")}
    [again] = run_sweep(params)
    assert again["mlflow_run_id"] != summary["mlflow_run_id"]
    assert client.get_run(again["mlflow_run_id"]).info.run_name == run.info.run_name
    assert {s: _mtimes(tiny_project, s) for s in before} == before
    # Changing only an evaluation parameter reruns only evaluation (into the same folders).
    evaluated = {s: _mtimes(tiny_project, s) for s in ("evaluate", "evaluate-dense")}
    changed = validate(
        type(params),
        {**params.model_dump(), "evaluate": {**params.evaluate.model_dump(), "limit": 3}},
    )
    [third] = run_sweep(changed)
    assert {s: _mtimes(tiny_project, s) for s in before} == before
    for stage, before_eval in evaluated.items():  # dense and pruned evaluated once more each
        assert _mtimes(tiny_project, stage)["metrics.json"] != before_eval["metrics.json"]
    name = "ppl/file-text.txt_s16"
    assert third["metrics"][name] != summary["metrics"][name]
    # A deleted artifact is rebuilt and a changed one recomputed, never served from a record.
    shutil.rmtree(checkpoint)
    allocation = checkpoint.parent / "allocate/allocation.json"
    allocation.write_text(allocation.read_text().replace('"keep_ratios"', '"keep_ratioz"'))
    [fourth] = run_sweep(params)
    assert (Path(fourth["checkpoint"]) / "model.safetensors").is_file()
    assert '"keep_ratios"' in allocation.read_text()
    assert fourth["metrics"][name] == summary["metrics"][name]  # limit back: evaluated again
    # The report accumulated the four sweeps and states how each one was made.
    report = (tiny_project / "out/report/report.md").read_text()
    assert "cfsp sweeps: 1 runs from 4 sweeps" in report
    sweep3 = report.split("### Sweep 3")[1].split("### Sweep")[0]
    assert "first 3 windows of 16 tokens" in sweep3 and "/runs/flow-run/" in sweep3
    assert f"- checkpoint tiny-p0.4-cfsp: {Path(fourth['checkpoint']).absolute()}" in report


def test_benchmark_flow_publishes_targets_and_rows(tmp_path, tiny_tokenizer, prefect_server):
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.benchmark import benchmark
    from tests.conftest import tiny_suite_argv

    argv = tiny_suite_argv(tmp_path, tiny_tokenizer, ["0.5"], ["default", "flap+liar"])
    state = benchmark(argv, return_state=True)
    targets = state.result()
    assert state.is_completed()
    by_name = {t["target"]: t for t in targets}
    assert "vs" in by_name["p=0.5: perplexity at least 30% lower than flap+liar"]["numbers"]
    assert (tmp_path / "BENCHMARKS.md").is_file() and (tmp_path / "suite.json").is_file()

    # Read back over the REST API. Prefect's own client sends null filters, which the server
    # under fastapi 0.154 rejects (422); omitted filters are accepted.
    api = PREFECT_API_URL.value()
    query = {"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}}
    reply = httpx.post(f"{api}/artifacts/filter", json={**query, "limit": 10, "offset": 0})
    reply.raise_for_status()
    found = {a["key"]: a for a in reply.json()}
    assert "flap+liar" in found["benchmark-targets"]["data"]
    rows = found["benchmark-rows"]["data"].splitlines()[2:]  # markdown: header, rule, rows
    assert [r.split(" | ")[1] for r in rows] == ["dense", "default", "flap+liar"]


def test_dask_task_runner_sweep(tiny_project, prefect_server, monkeypatch):
    from flows.compress import run_sweep

    monkeypatch.chdir(tiny_project)
    params = load_params("params.yaml")
    params = validate(
        type(params),
        {**params.model_dump(), "budgets": [0.3, 0.5], "runner": {"kind": "dask", "workers": 2}},
    )
    summaries = run_sweep(params)
    assert [s["budget"] for s in summaries] == [0.3, 0.5]
    assert summaries[0]["metrics"]["params/count"] > summaries[1]["metrics"]["params/count"]


def test_cron_deployment_is_created(tiny_project, prefect_server):
    from prefect import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.compress import DeploySpec, sweep_deployment

    params = load_params(tiny_project / "params.yaml")
    deployment = sweep_deployment(params, DeploySpec("nightly-test", "0 3 * * *"))
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = run_coro_as_sync(read())
    assert stored.name == "nightly-test"
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * *"]
    assert stored.parameters["params"]["models"] == ["tiny"]


def _cli(cwd: Path, *args: str, timeout: int = 600):
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", COLUMNS="200"
    )
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_invalid_params_fail_before_any_work(tiny_project):
    params = (tiny_project / "params.yaml").read_text()
    (tiny_project / "params.yaml").write_text(params.replace("nsamples:", "nsample:"))
    proc = _cli(tiny_project, sys.executable, "-m", "cfsp.cli", "run")
    assert proc.returncode == 2
    assert (
        "prepare.nsample: unknown key" in proc.stderr and "did you mean 'nsamples'" in proc.stderr
    )
    assert not (tiny_project / "out").exists()
    (tiny_project / "params.yaml").write_text(params.replace("budgets:\n- 0.4", "budgets:\n- 1.4"))
    proc = _cli(tiny_project, sys.executable, "-m", "cfsp.cli", "run")
    assert proc.returncode == 2 and "1.4 is not in [0, 1)" in proc.stderr
    assert not (tiny_project / "out").exists()


def _dvc_project(project: Path) -> None:
    """`project` as a git + DVC repository with the repository's dvc.yaml, committed. The cache
    hard-links outputs (as the repository's .dvc/config asks), so they are stored once."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "dvc.yaml", project / "dvc.yaml")
    # The stages declare the library's code as dependencies, as in the project itself.
    shutil.copytree(repo / "cfsp", project / "cfsp", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "config", "cache.type", "hardlink,copy"],
    ):
        assert _cli(project, *cmd).returncode == 0
    (project / ".gitignore").write_text("out/\n")
    _cli(project, "git", "add", "-A")
    assert _cli(project, "git", "commit", "-qm", "init").returncode == 0


def _children(client, name: str) -> list:
    exp = client.get_experiment_by_name("cfsp")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return sorted(runs, key=lambda r: r.info.start_time)


def test_one_store_one_lineage_from_cfsp_run_and_dvc(tiny_project, prefect_server, monkeypatch):
    """`cfsp run` in a DVC project: its stages land where dvc.yaml declares them and are
    committed (dvc.lock, .dvc/cache: `dvc status` is clean, `dvc repro` has nothing to do);
    dvc.yaml's `track` stage logs the same MLflow runs and tags; `dvc exp run` then runs only
    the new stages, and experiments compare."""
    import mlflow
    import yaml

    from flows.compress import run_sweep

    _dvc_project(tiny_project)
    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [summary] = run_sweep(load_params("params.yaml"))
    assert not (tiny_project / "out/store").exists()
    status = _cli(tiny_project, "dvc", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"]
    assert {"prepare@tiny", "reconstruct@tiny-0.4-cfsp", "track"} <= set(lock)
    weights = tiny_project / summary["checkpoint"] / "model.safetensors"
    assert weights.stat().st_nlink >= 2  # the workspace file is the cache's (hard link)
    again = _cli(tiny_project, "dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'out/mlflow.db'}")
    prefect_run = client.get_run(summary["mlflow_run_id"])
    tags = prefect_run.data.tags
    assert tags["dvc.lineage"] == "dvc.lock"
    md5 = next(o["md5"] for o in lock["reconstruct@tiny-0.4-cfsp"]["outs"])
    assert tags["dvc.checkpoint.md5"] == md5 and tags["dvc.checkpoint.stage"] in lock
    # The same MLflow runs when DVC starts them: dvc.yaml's final stage.
    tracked = _cli(tiny_project, "dvc", "repro", "--force", "--single-item", "track")
    assert tracked.returncode == 0, tracked.stdout + tracked.stderr
    first, second = _children(client, "tiny-p0.4-cfsp")
    assert first.info.run_id == prefect_run.info.run_id
    assert set(second.data.tags) == set(tags) and set(second.data.metrics) == set(
        prefect_run.data.metrics
    )
    assert second.data.tags["dvc.checkpoint.md5"] == md5
    assert second.data.tags["prefect.flow_run_id"] == "none"
    parents = {r.data.tags["mlflow.parentRunId"] for r in (first, second)}
    assert len(parents) == 2 and all(
        client.get_run(p).data.tags["dvc.lineage"] == "dvc.lock" for p in parents
    )

    _cli(tiny_project, "git", "add", "-A")
    _cli(tiny_project, "git", "commit", "-qm", "lineage")
    exp = _cli(tiny_project, "dvc", "exp", "run", "-n", "b03", "-S", "budgets=[0.3]")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert "Running stage 'evaluate@tiny-0.3-cfsp'" in exp.stdout
    assert "Running stage 'capture@tiny'" not in exp.stdout  # shared upstream reused
    assert "Running stage 'track'" in exp.stdout
    metrics = _cli(tiny_project, "dvc", "metrics", "show")
    assert "metrics/tiny/cfsp-p0.3.json" in metrics.stdout
    _compare_experiments(tiny_project, "b03")

    # The other way round: `cfsp run` of the experiment's params (left in the workspace) reuses
    # the stage records DVC's stages wrote; nothing is recomputed, and DVC stays up to date.
    # (The stage record, not the weights' mtime: DVC may relink a cached file, which moves its
    # mtime without any stage running; a stage that ran writes a new record.)
    record = tiny_project / "out/dvc/tiny/cfsp-p0.3/reconstructed/cfsp_stage.json"
    written = record.read_text()
    [reused] = run_sweep(load_params("params.yaml"))
    assert reused["budget"] == 0.3 and record.read_text() == written
    assert "up to date" in _cli(tiny_project, "dvc", "status").stdout


def _compare_experiments(project: Path, name: str) -> None:
    """The committed baseline and experiment `name` both show numeric metrics in `dvc exp show`
    (metrics and plot data are git-tracked files outside out/), and `dvc plots diff` renders."""
    shown = _cli(project, "dvc", "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    revs = {}
    for commit in json.loads(shown.stdout):
        revs[commit["rev"]] = commit["data"]["metrics"]
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                revs[rev["name"]] = rev["data"]["metrics"]
    baseline = next(rev for rev in revs if rev not in ("workspace", name))
    for rev, budget in ((baseline, "0.4"), (name, "0.3")):
        pruned = revs[rev][f"metrics/tiny/cfsp-p{budget}.json"]["data"]
        dense = revs[rev]["metrics/tiny/dense.json"]["data"]
        ppl = [v for k, v in pruned.items() if k.startswith("ppl/") and not k.endswith("_ratio")]
        assert ppl and min(ppl) > 1  # the flat schema of cfsp.metrics
        assert 0 < pruned["params/count"] < dense["params/count"]
    html = project / "plots-diff"
    diff = _cli(project, "dvc", "plots", "diff", baseline, name, "-o", str(html))
    assert diff.returncode == 0, diff.stdout + diff.stderr
    page = (html / "index.html").read_text()
    assert "plots/tiny/cfsp-p0.4/keep.csv" in page and "plots/tiny/cfsp-p0.3/keep.csv" in page


def _run_with_fault(project: Path, cmd: tuple, **fault: str) -> int:
    """Run `cmd` with a fault-injection variable set; return its exit status.

    Own process group, output to a file: a killed run's temporary Prefect server outlives it
    and would hold a pipe open; the group is killed once the run itself is dead."""
    with open(project / "killed.log", "w") as log:
        run = subprocess.Popen(
            cmd,
            cwd=project,
            env=dict(os.environ, **fault),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        code = run.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    return code


def test_killed_run_resumes_to_identical_outputs(tiny_project, tmp_path_factory, tiny_tokenizer):
    """SIGKILL in the middle of capture, then after each stage in turn; the final rerun gives
    the same weights as an uninterrupted run."""

    fresh = tmp_path_factory.mktemp("uninterrupted")
    for name in ("tiny", "text.txt", "params.yaml"):
        src = tiny_project / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, fresh / name)
    cmd = (sys.executable, "-m", "cfsp.cli", "run")
    assert _run_with_fault(tiny_project, cmd, CFSP_FAULT_KILL_AFTER_BLOCK="0") == -signal.SIGKILL
    from cfsp.pipeline.store import RECORD, stage_dir

    def folder(stage: str) -> Path:
        return stage_dir(tiny_project / "out", stage, "tiny", 0.4, "cfsp")

    assert (folder("prepare") / RECORD).is_file()  # the finished stage stays, recorded
    assert not folder("capture").exists()  # no finished capture exists, half-written or not
    # Then SIGKILL at every stage boundary in turn: artifact written, not yet recorded.
    # prune and reconstruct both follow allocate and run side by side: when the round that
    # kills after prune lets reconstruct finish first, reconstruct is recorded and not run again.
    killed = []
    for stage in ("capture", "allocate", "prune", "reconstruct", "evaluate"):
        if (folder(stage) / RECORD).is_file():
            assert stage == "reconstruct", stage
            continue
        code = _run_with_fault(tiny_project, cmd, CFSP_FAULT_KILL_AFTER_STAGE=stage)
        assert code == -signal.SIGKILL, (stage, (tiny_project / "killed.log").read_text()[-2000:])
        assert folder(stage).is_dir() and not (folder(stage) / RECORD).exists()
        killed.append(stage)
    assert {"capture", "allocate", "prune", "evaluate"} <= set(killed), killed
    resumed = _cli(tiny_project, *cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = _cli(fresh, *cmd)
    assert clean.returncode == 0, clean.stderr[-3000:]

    def weights(root: Path) -> list[str]:
        return [sha256_file(p) for p in sorted((root / "out/dvc").glob("*/*/*/model*.safetensors"))]

    assert weights(tiny_project) == weights(fresh) and len(weights(fresh)) == 3  # pruned,
    # reconstructed, and model (recovery off: hard links to reconstructed, as in dvc.yaml)


def test_unreachable_tracking_server_fails_before_work(tiny_project, prefect_server, monkeypatch):
    from cfsp.errors import CfspError
    from flows.compress import run_sweep

    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(CfspError, match="not reachable"):
        run_sweep(load_params("params.yaml"))
    assert not (tiny_project / "out/dvc").exists()


def test_unreachable_prefect_server_is_one_clear_error(tiny_project):
    env = dict(os.environ, PREFECT_API_URL="http://127.0.0.1:9/api")
    proc = subprocess.run(
        [sys.executable, "-m", "cfsp.cli", "run"],
        cwd=tiny_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Prefect is not available" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tiny_project / "out/dvc").exists()


def test_stage_functions_chain_with_sequential_statistics(tiny_project, monkeypatch):
    from cfsp.config import prune_config
    from cfsp.pipeline import stages

    monkeypatch.chdir(tiny_project)
    p = load_params("params.yaml")
    cfg = prune_config(p, "cfsp+stats=sequential", 0.4)
    out = tiny_project / "stages"
    stages.prepare("tiny", p.prepare, out / "prepare")
    stages.capture_stage("tiny", out / "prepare", out / "capture")
    # The capture is pass 1 of the streamed engine: an O(width) moments file and one file of
    # Gram matrices per block (nothing width^2 holds more than one block).
    grams = sorted(f.name for f in (out / "capture/grams").iterdir())
    assert grams == ["block-00000.safetensors", "block-00001.safetensors"]
    with safe_open(str(out / "capture/moments.safetensors"), "pt") as handle:
        assert all(handle.get_slice(k).get_shape()[0] <= 96 for k in handle.keys())  # noqa: SIM118
        assert all(len(handle.get_slice(k).get_shape()) == 1 for k in handle.keys())  # noqa: SIM118
    stages.allocate_stage("tiny", out / "capture", cfg, out / "allocate")
    stages.prune_stage("tiny", out / "capture", out / "allocate", cfg, out / "pruned")
    _check_tampered_grams(out, cfg)
    stages.reconstruct_stage(
        "tiny", out / "allocate", out / "capture", cfg, out / "model", out / "prepare"
    )
    pruned, rebuilt = read_manifest(out / "pruned"), read_manifest(out / "model")
    assert pruned["prune"]["config"]["reconstruct"] == "none"
    assert rebuilt["prune"]["config"]["stats"] == "sequential"
    assert rebuilt["prune"]["kept"] == pruned["prune"]["kept"]
    errors = rebuilt["prune"]["reconstruction_error"]
    assert all(e["down_after"] <= e["down_before"] + 1e-9 for e in errors)
    metrics = stages.evaluate_stage(str(out / "model"), p.evaluate, out / "evaluate")
    assert metrics["params"] < stages.evaluate_stage("tiny", p.evaluate, out / "dense")["params"]

    # Recovery: disabled passes the checkpoint through; enabled heals it, same shapes.
    stages.recover_stage(out / "model", out / "capture", p.recover, out / "same")
    assert verify_checkpoint(out / "same") == []
    shards = sorted(f.name for f in (out / "model").glob("*.safetensors"))
    assert shards and all(
        sha256_file(out / "same" / name) == sha256_file(out / "model" / name) for name in shards
    )
    heal = RECOVER.model_copy(update={"enabled": True})
    info = stages.recover_stage(out / "model", out / "capture", heal, out / "healed")
    assert len(info["losses"]) == heal.steps and info["trainable_params"] > 0
    healed = read_manifest(out / "healed")
    assert healed["recover"]["ranks"] == info["ranks"] and verify_checkpoint(out / "healed") == []
    assert (out / "healed/recover_loss.png").stat().st_size > 1000
    after = stages.evaluate_stage(str(out / "healed"), p.evaluate, out / "evaluate-healed")
    assert after["params"] == metrics["params"]


def _check_tampered_grams(out: Path, cfg) -> None:
    """A block's Gram file changed or removed after the capture: refused, nothing written."""
    from cfsp.errors import CfspError
    from cfsp.pipeline import stages

    bad = out / "capture-bad"
    shutil.copytree(out / "capture", bad)
    block = bad / "grams/block-00001.safetensors"
    data = bytearray(block.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes inf
    block.write_bytes(bytes(data))
    with pytest.raises(CfspError, match="changed since the capture"):
        stages.prune_stage("tiny", bad, out / "allocate", cfg, out / "bad-pruned")
    block.unlink()
    with pytest.raises(CfspError, match="block-00001.safetensors is missing"):
        stages.prune_stage("tiny", bad, out / "allocate", cfg, out / "bad-pruned")
    assert not (out / "bad-pruned").exists()


RECOVER = RecoverConfig(source="file:text.txt", nsamples=4, seqlen=16, batch=2, steps=3, rank=2)


def test_flow_with_recovery_logs_the_loss_curve(tiny_project, prefect_server, monkeypatch):
    import mlflow

    from flows.compress import run_sweep

    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params("params.yaml")
    heal = RECOVER.model_copy(update={"enabled": True}).model_dump()
    [summary] = run_sweep(validate(type(params), {**params.model_dump(), "recover": heal}))
    assert summary["checkpoint"] == "out/dvc/tiny/cfsp-p0.4/model"  # the recover stage's
    assert read_manifest(summary["checkpoint"])["recover"]["mode"] == "ig"
    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'out/mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["time/recover_s"] > 0 and run.data.metrics["recover/final_loss"] > 0
    history = client.get_metric_history(run.info.run_id, "recover/loss")
    assert [m.step for m in history] == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recover_loss.png", "report"} <= names
    parent = summary["mlflow_parent_run_id"]  # the sweep's reports are the parent run's
    assert run.data.tags["mlflow.parentRunId"] == parent
    sweep = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert {"sweep/report.html", "sweep/ppl_vs_budget.png", "sweep/tradeoff.png"} <= sweep
