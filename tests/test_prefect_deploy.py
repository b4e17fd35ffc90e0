"""`cfsp deploy` against a real Prefect server on 127.0.0.1: the sweep deployed to a process
work pool (schedule, time zone, concurrency limit, typed parameters), run by a real `prefect
worker` process, read back over the REST API: flow- and task-run names, cfsp's log lines in the
run's logs, results persisted as JSON. Plus the refusals that need no server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cfsp.cli import main
from cfsp.config import Params  # module level: the probe flow's annotation names it
from cfsp.interrupts import stop_group

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(home: Path, url: str, **extra: str) -> dict[str, str]:
    """A child process of this checkout talking to the test server, Prefect state in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFSP_FAULT")}
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        COLUMNS="200",
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1 (sqlite in its own PREFECT_HOME, no
    UI); its whole process group is stopped at the end. Yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _port()
    url = f"http://127.0.0.1:{port}/api"
    env = _env(home, "", PREFECT_UI_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1")
    env.pop("PREFECT_API_URL")
    log = open(home / "server.log", "wb")  # noqa: SIM115 -- closed in the finalizer
    cmd = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not answer in 240 s"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield url
    finally:
        stop_group(proc)
        log.close()


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _post(url: str, path: str, body: dict) -> list[dict]:
    reply = httpx.post(f"{url}{path}", json=body, timeout=30)
    reply.raise_for_status()
    return reply.json()


def _wait_final(url: str, run_id: str, worker: subprocess.Popen, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run = httpx.get(f"{url}/flow_runs/{run_id}", timeout=30).json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {seconds} s")


def _run_logs(url: str, run_id: str, starts: tuple[str, ...], seconds: float = 60) -> list[str]:
    """The flow run's log messages, once one starts with each of `starts`: Prefect ships logs
    in batches, so the last lines may reach the server after the run is COMPLETED."""
    deadline = time.monotonic() + seconds
    while True:
        messages, page = [], None
        while page is None or len(page) == 200:  # the API's largest page
            body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
            body["sort"] = "TIMESTAMP_ASC"  # a stable order across pages
            page = _post(url, "/logs/filter", {**body, "offset": len(messages)})
            messages += [entry["message"] for entry in page]
        found = all(any(m.startswith(s) for m in messages) for s in starts)
        if found or time.monotonic() > deadline:
            return messages
        time.sleep(2)


def test_deploy_worker_run_names_logs_and_json_results(tiny_project, prefect_api, tmp_path):
    url = prefect_api
    home, results = tmp_path / "prefect-client", tmp_path / "results"
    env = _env(home, url, PREFECT_LOCAL_STORAGE_PATH=str(results))
    deploy = [
        *(sys.executable, "-m", "cfsp.cli", "deploy", "--name", "nightly", "--pool", "cfsp-test"),
        *("--cron", "0 3 * * *", "--timezone", "Europe/Berlin", "--concurrency", "1"),
        *("-S", "evaluate.speed.enabled=false"),
    ]
    done = _run(deploy, tiny_project, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "created process work pool 'cfsp-test'" in done.stdout

    # The deployment as the server holds it: pool, schedule, limit, typed default parameters.
    stored = httpx.get(f"{url}/deployments/name/sweep/nightly", timeout=30).json()
    assert stored["work_pool_name"] == "cfsp-test"
    assert stored["entrypoint"] == "cfsp.pipeline.flows.sweep"
    [schedule] = [s["schedule"] for s in stored["schedules"]]
    assert (schedule["cron"], schedule["timezone"]) == ("0 3 * * *", "Europe/Berlin")
    assert stored["global_concurrency_limit"]["limit"] == 1
    assert stored["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert stored["job_variables"]["working_dir"] == str(tiny_project)
    params = stored["parameters"]["params"]
    assert params["models"] == ["tiny"] and params["evaluate"]["speed"]["enabled"] is False
    schema = stored["parameter_openapi_schema"]
    assert schema["properties"]["params"]["$ref"].endswith("/Params")
    assert "budgets" in schema["definitions"]["Params"]["properties"]
    pool = httpx.get(f"{url}/work_pools/cfsp-test", timeout=30).json()
    assert pool["type"] == "process"

    # The server validates a custom run against the params model (the UI's form does too).
    bad = httpx.post(
        f"{url}/deployments/{stored['id']}/create_flow_run",
        json={"parameters": {"params": {**params, "dtype": "float8"}}},
        timeout=30,
    )
    assert bad.status_code == 409 and "float8" in bad.text, bad.text  # 409: schema says no

    triggered = _run([*PREFECT, "deployment", "run", "sweep/nightly"], tiny_project, env)
    assert triggered.returncode == 0, triggered.stderr[-3000:]
    [run_id] = re.findall(r"UUID: ([0-9a-f-]{36})", triggered.stdout)
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "cfsp-test", "--run-once"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        run = _wait_final(url, run_id, worker, 240)
        # --run-once exits once its flow-run process has exited, which first ships its last
        # log lines: stopping the group at COMPLETED would lose them.
        worker.wait(timeout=120)
    finally:
        stop_group(worker, grace=30)
    output = worker.stdout.read()[-4000:]
    assert run["state"]["type"] == "COMPLETED", output
    assert run["name"] == "sweep-tiny"

    tasks = _post(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    names = {t["name"] for t in tasks}
    assert {"prepare-tiny", "evaluate-dense-tiny", "prune-p0.4-cfsp"} <= names, names
    assert {"reconstruct-p0.4-cfsp", "track-tiny-p0.4-cfsp"} <= names, names
    # Per-block lines of the streamed engine's two passes (capture = pass 1; prune and
    # reconstruct = pass 2) and the sweep's own last line, from loggers cfsp.engine.* and cfsp.
    starts = ("stream pass 1 block ", "stream pass 2 block ", "sweep of 1 runs took")
    messages = _run_logs(url, run_id, starts)
    lines = "\n".join(m for m in messages if " block " in m or " took " in m)
    for start in starts:
        assert any(m.startswith(start) for m in messages), f"{start}:\n{lines}\n{output}"
    assert (tiny_project / "out" / "runs" / "tiny-p0.4-cfsp" / "summary.json").is_file()
    assert "Loading weights" not in output  # transformers' bars are off in a worker's run too

    # Stage results live in the store as JSON stage records; Prefect persists none of its own,
    # and any result it did persist would be JSON written by the JSON serializer, never pickle.
    records = list((tiny_project / "out" / "dvc").rglob("cfsp_stage.json"))
    assert records and all(json.loads(r.read_text())["stage"] for r in records)
    files = [f for f in results.rglob("*") if f.is_file()]
    for f in files:
        record = json.loads(f.read_bytes())
        assert record["metadata"]["serializer"]["type"] == "json", f
        assert b"pickle" not in f.read_bytes(), f


def test_a_pool_of_another_type_is_refused(prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cfsp.errors import UsageError
    from cfsp.pipeline.deploy import ensure_process_pool

    reply = httpx.post(
        f"{prefect_api}/work_pools/",
        json={"name": "not-process", "type": "kubernetes", "base_job_template": {}},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        with pytest.raises(UsageError, match="work pool 'not-process' is of type 'kubernetes'"):
            ensure_process_pool("not-process")
        assert ensure_process_pool("fresh-pool") is True  # created, then found
        assert ensure_process_pool("fresh-pool") is False
    assert httpx.get(f"{prefect_api}/work_pools/fresh-pool").json()["type"] == "process"


def test_serve_registers_the_same_deployment(tiny_project, prefect_api, tmp_path):
    """`cfsp serve` registers the sweep (schedule in its time zone, concurrency limit, typed
    parameters) and keeps serving it until stopped."""
    url = prefect_api
    cmd = [
        *(sys.executable, "-m", "cfsp.cli", "serve", "--name", "served", "--cron", "30 4 * * 1"),
        *("--timezone", "Asia/Tokyo", "--concurrency", "2", "-S", "budgets=[0.2]"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tiny_project,
        env=_env(tmp_path / "home", url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, stored = time.monotonic() + 240, None
        while stored is None:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "cfsp serve registered nothing in 240 s"
            reply = httpx.get(f"{url}/deployments/name/sweep/served", timeout=30)
            stored = reply.json() if reply.status_code == 200 else time.sleep(2)
    finally:
        stop_group(proc)
    [schedule] = [s["schedule"] for s in stored["schedules"]]
    assert (schedule["cron"], schedule["timezone"]) == ("30 4 * * 1", "Asia/Tokyo")
    assert stored["global_concurrency_limit"]["limit"] == 2
    assert stored["parameters"]["params"]["budgets"] == [0.2]
    assert stored["work_pool_name"] is None


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "args,api,code,match",
    [
        ((), None, 2, "PREFECT_API_URL is not set"),
        ((), "http://127.0.0.1:{port}/api", 1, "no Prefect server answers at PREFECT_API_URL"),
        (("--timezone", "Mars/Base"), None, 2, "invalid --timezone 'Mars/Base'"),
        (("--cron", "61 * * * *"), None, 2, "invalid --cron '61 * * * *'"),
        (("--concurrency", "0"), None, 2, "--concurrency 0: at least 1"),
        (("--pool", "a/b"), None, 2, "invalid --pool 'a/b'"),
        (("-S", "budgets=[1.5]"), None, 2, "1.5 is not in [0, 1)"),
    ],
    ids=["no-api-url", "no-server", "timezone", "cron", "concurrency", "pool-name", "params"],
)
def test_deploy_refuses_before_registering(
    tiny_project, capsys, monkeypatch, args, api, code, match
):
    """One `error:` line, before anything reaches a server (none runs here)."""
    for key in (
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
        "PREFECT_SERVER_API_HOST",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER",
        "PREFECT_LOGGING_EXTRA_LOGGERS",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW",
        "PREFECT_API_URL",
    ):
        monkeypatch.delenv(key, raising=False)  # restored after configure_prefect sets them
    if api:
        monkeypatch.setenv("PREFECT_API_URL", api.format(port=_port()))
    monkeypatch.chdir(tiny_project)
    got, err = _cli(capsys, "deploy", *args)
    assert got == code and match in _error(err)
    assert not (tiny_project / "out").exists()


def test_serve_refuses_without_a_server(tiny_project, capsys, monkeypatch):
    """`cfsp serve` no longer serves against a temporary server that dies with it."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for key in ("PREFECT_RESULTS_DEFAULT_SERIALIZER", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tiny_project)
    got, err = _cli(capsys, "serve", "--cron", "0 3 * * *", "--timezone", "Asia/Tokyo")
    assert got == 2 and "PREFECT_API_URL is not set" in _error(err)


def test_run_names_of_tasks_and_flows():
    """The names the UI lists, from the task's parameters and the flow's."""
    from cfsp.pipeline.keys import sweep_name
    from cfsp.pipeline.tasks import task_run_name

    prune = {"budget": 0.3, "method": "cfsp"}
    assert task_run_name({"stage": "prune", "model": "smollm2-135m", "prune": prune}) == (
        "prune-p0.3-cfsp"
    )
    assert task_run_name({"stage": "prepare", "model": "/m/SmolLM2-135M", "prune": None}) == (
        "prepare-SmolLM2-135M"
    )
    assert sweep_name(["smollm2-135m"]) == "sweep-smollm2-135m"
    assert sweep_name(["a", "/x/b", "a"]) == "sweep-a+b"


def test_tasks_run_on_the_runner_the_params_name(prefect_api):
    """`runner` is honoured inside the run itself (a deployed run loads the flow with its
    decorator's runner): tasks submitted in `_runner_of` go to a pool of params.runner.workers."""
    import threading

    from prefect import flow, task
    from prefect.context import FlowRunContext
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    from cfsp.pipeline.flows import _runner_of

    @task(persist_result=False, result_serializer="json")
    def where() -> str:
        return threading.current_thread().name

    @flow(persist_result=False, result_serializer="json")
    def probe(params: Params) -> tuple:
        default = FlowRunContext.get().task_runner
        with _runner_of(params):
            runner = FlowRunContext.get().task_runner
            names = [f.result() for f in [where.submit() for _ in range(4)]]
        return default, runner, names, FlowRunContext.get().task_runner

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        default, runner, names, after = probe(Params(runner={"kind": "threads", "workers": 3}))
        APILogHandler().flush()  # ship the probe's logs while this module's server is up
    assert isinstance(runner, ThreadPoolTaskRunner) and runner is not default
    assert runner._max_workers == 3 and after is default
    assert all(n.startswith("ThreadPoolExecutor") for n in names), names
