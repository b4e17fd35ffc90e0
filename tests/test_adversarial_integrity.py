"""Adversarial cases for integrity, interrupts, servers and exposure (docs/reliability.md, the
rows after the input catalogue): tampered checkpoints, signals at exact moments, writers killed
with SIGKILL, concurrent runs and verifies, odd environment values, servers' ports, a real full
disk. CPU-sized: tiny models; the few subprocess tests that start servers are the slow ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cfsp.errors import CfspError
from cfsp.export import MANIFEST, verify_checkpoint
from cfsp.io import atomic_dir, sha256_file, write_json
from tests import test_catalogue
from tests.test_catalogue import cli, error_line, hidden, prune_args, snapshot

ROOT = Path(__file__).resolve().parents[1]
proj = test_catalogue.proj  # the catalogue's tiny model, text, params.yaml and checkpoint


# -- helpers --------------------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    """This checkout's cfsp in a child process (the console script may point elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFSP_FAULT")}
    env.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run_cli(*args, timeout: float = 300, cwd: Path | None = None, **env: str):
    return subprocess.run(
        [sys.executable, "-m", "cfsp.cli", *map(str, args)],
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def spawn_cli(*args, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cfsp.cli", *map(str, args)],
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_interrupted_line(err: str, name: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert lines == [f"interrupted ({name})"], err[-3000:]


def edit_manifest(ckpt: Path, edit) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps(edit(manifest)))


def params_in(proj: Path, folder: Path) -> Path:
    """The project's params.yaml with its output in `folder` / "out"."""
    data = yaml.safe_load((proj / "params.yaml").read_text())
    data["output"] = str(folder / "out")
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "params.yaml"


@pytest.fixture
def ckpt(proj, tmp_path) -> Path:
    """A copy of the finished checkpoint (per-block widths: it ships modeling_cfsp.py)."""
    shutil.copytree(proj / "ckpt", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_cfsp.py").is_file()
    return tmp_path / "ckpt"


# -- integrity: cfsp verify -----------------------------------------------------------------------
def _tamper(ckpt: Path, case: str, outside: Path) -> None:
    """Damage `ckpt` the way `case` names."""
    if case == "modeling-replaced":
        (ckpt / "modeling_cfsp.py").write_text("import os\nos.system('echo owned')\n")
    elif case == "config-edited":
        config = json.loads((ckpt / "config.json").read_text())
        config["num_hidden_layers"] = 1
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "tokenizer-swapped":
        tok = json.loads((ckpt / "tokenizer.json").read_text())
        tok["model"]["vocab"] = {k: (v + 1) % 128 for k, v in tok["model"]["vocab"].items()}
        (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    elif case == "tokenizer-config-swapped":
        (ckpt / "tokenizer_config.json").write_text('{"eos_token": "<unk>"}')
    elif case == "generation-config-edited":
        (ckpt / "generation_config.json").write_text('{"max_new_tokens": 100000}')
    elif case == "config-deleted":
        (ckpt / "config.json").unlink()
    elif case == "extra-code":
        (ckpt / "evil.py").write_text("raise SystemExit('owned')\n")
    elif case == "weights-symlinked-outside":
        shutil.move(ckpt / "model.safetensors", outside / "model.safetensors")
        (ckpt / "model.safetensors").symlink_to(outside / "model.safetensors")
    elif case == "unrecorded-symlink":
        (ckpt / "notes.md").symlink_to("/etc/passwd")
    elif case == "empty-weights-no-files":
        (ckpt / "model.safetensors").unlink()
        edit_manifest(ckpt, lambda m: {"weights_sha256": {}})
    elif case == "files-without-weights":
        (ckpt / "model.safetensors").unlink()
        edit_manifest(
            ckpt, lambda m: {"files_sha256": {"config.json": m["files_sha256"]["config.json"]}}
        )
    elif case == "traversal-name":
        edit_manifest(
            ckpt, lambda m: {**m, "files_sha256": {**m["files_sha256"], "../x": "0" * 64}}
        )
    elif case == "absolute-name":
        edit_manifest(
            ckpt, lambda m: {**m, "files_sha256": {**m["files_sha256"], "/etc/passwd": "0" * 64}}
        )
    elif case == "bad-digest":
        edit_manifest(
            ckpt, lambda m: {**m, "files_sha256": {**m["files_sha256"], "config.json": 42}}
        )
    elif case == "old-and-new-keys-disagree":
        edit_manifest(ckpt, lambda m: {**m, "weights_sha256": {"model.safetensors": "0" * 64}})
    elif case == "subdirectory-recorded":
        (ckpt / "sub").mkdir()
        edit_manifest(ckpt, lambda m: {**m, "files_sha256": {**m["files_sha256"], "sub": "0" * 64}})
    else:
        raise AssertionError(case)


TAMPERED = {
    "modeling-replaced": "modeling_cfsp.py: sha256",
    "config-edited": "config.json: sha256",
    "tokenizer-swapped": "tokenizer.json: sha256",
    "tokenizer-config-swapped": "tokenizer_config.json: sha256",
    "generation-config-edited": "generation_config.json: sha256",
    "config-deleted": "config.json: recorded in the manifest but missing",
    "extra-code": "evil.py: not recorded in the manifest",
    "weights-symlinked-outside": "model.safetensors: is a symbolic link (to ",
    "unrecorded-symlink": "notes.md: is a symbolic link, not recorded in the manifest",
    "empty-weights-no-files": "the manifest lists no weight files",
    "files-without-weights": "the manifest lists no weight files",
    "traversal-name": "'../x': not a file name inside the checkpoint",
    "absolute-name": "'/etc/passwd': not a file name inside the checkpoint",
    "bad-digest": "config.json: recorded digest 42 is not a sha256",
    "old-and-new-keys-disagree": "model.safetensors: weights_sha256 and files_sha256 disagree",
    "subdirectory-recorded": "sub: is not a regular file",
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoint_fails_verify(ckpt, tmp_path, capsys, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    code, _, err = cli(capsys, "verify", ckpt)
    assert code == 0, err
    _tamper(ckpt, case, outside)
    code, _, err = cli(capsys, "verify", ckpt)
    line = error_line(err)
    assert code == 1 and "does not match its manifest" in line and TAMPERED[case] in line, line


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "cfsp_manifest.json is not valid JSON"),
        ("[1, 2]", "cfsp_manifest.json holds a JSON array, expected a JSON object"),
        ('"text"', "cfsp_manifest.json holds a string, expected a JSON object"),
        ('{"files_sha256": "abc"}', "files_sha256 must map file names to sha256 digests"),
        ('{"weights_sha256": ["model.safetensors"]}', "weights_sha256 must map file names"),
    ],
    ids=["not-json", "list", "string", "files-not-a-map", "old-key-not-a-map"],
)
def test_manifest_of_the_wrong_shape(ckpt, capsys, content, match):
    (ckpt / MANIFEST).write_text(content)
    code, _, err = cli(capsys, "verify", ckpt)
    assert code == 1 and match in error_line(err)


def test_verify_of_a_file_a_folder_manifest_and_an_old_manifest(ckpt, tmp_path, capsys):
    code, _, err = cli(capsys, "verify", ckpt / "config.json")
    assert code == 2 and "is not a checkpoint directory" in error_line(err)
    folder = tmp_path / "odd"
    (folder / MANIFEST).mkdir(parents=True)
    code, _, err = cli(capsys, "verify", folder)
    assert code == 2 and "cfsp_manifest.json is a directory, not a regular file" in error_line(err)

    code, out, _ = cli(capsys, "verify", ckpt)
    manifest_sha = sha256_file(ckpt / MANIFEST)
    # weights, config, generation config, modeling file, tokenizer files and the model card
    assert code == 0 and "(all 7 files checked)" in out and f"manifest sha256 {manifest_sha}" in out
    edit_manifest(ckpt, lambda m: {k: v for k, v in m.items() if k != "files_sha256"})
    code, out, _ = cli(capsys, "verify", ckpt)  # a checkpoint of an older release
    assert code == 0 and "older manifest: only the weights are recorded" in out


# -- integrity: shipped code under --trust-remote-code -------------------------------------------
def _eval_remote(capsys, model: Path, proj: Path, out: Path):
    text = f"file:{proj / 'text.txt'}"
    return cli(
        capsys, "eval", "--model", model, "--data", text, "--seqlen", "16", "--limit", "1",
        "--out", out, "--trust-remote-code",
    )  # fmt: skip


def _plant_code(ckpt: Path, marker: Path, case: str) -> None:
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    if case == "modeling-replaced":
        (ckpt / "modeling_cfsp.py").write_text(payload)
    elif case == "auto-map-redirected":
        (ckpt / "evil.py").write_text(payload)
        config = json.loads((ckpt / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "evil.CfspLlamaForCausalLM"}
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "old-manifest":
        (ckpt / "modeling_cfsp.py").write_text(payload)
        edit_manifest(ckpt, lambda m: {k: v for k, v in m.items() if k != "files_sha256"})
    elif case == "code-symlinked":
        (ckpt.parent / "elsewhere.py").write_text((ckpt / "modeling_cfsp.py").read_text())
        (ckpt / "modeling_cfsp.py").unlink()
        (ckpt / "modeling_cfsp.py").symlink_to(ckpt.parent / "elsewhere.py")


@pytest.mark.parametrize(
    "case,match",
    [
        ("modeling-replaced", "modeling_cfsp.py: sha256"),
        ("auto-map-redirected", "config.json: sha256"),
        ("old-manifest", "modeling_cfsp.py: no sha256 recorded (manifest of an older cfsp)"),
        ("code-symlinked", "modeling_cfsp.py: is a symbolic link"),
    ],
)
def test_shipped_code_that_does_not_match_never_runs(proj, ckpt, tmp_path, capsys, case, match):
    marker = tmp_path / "code-ran"
    _plant_code(ckpt, marker, case)
    code, _, err = _eval_remote(capsys, ckpt, proj, tmp_path / "result.json")
    line = error_line(err)
    assert code == 1 and "refusing to run the code shipped in" in line and match in line, line
    assert not marker.exists() and not (tmp_path / "result.json").exists()


def test_intact_shipped_code_loads_with_trust_remote_code(proj, ckpt, tmp_path, capsys):
    code, out, err = _eval_remote(capsys, ckpt, proj, tmp_path / "result.json")
    assert code == 0, err
    assert "ppl=" in out and (tmp_path / "result.json").is_file()


# -- temporaries of dead writers ------------------------------------------------------------------
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dest = tmp_path / "artifact"
    gone = dead_pid()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".artifact.tmp-{gone}-abcd1234",
            "own-pid-unregistered": f".artifact.tmp-{os.getpid()}-zz99",
            "dead-file": f".artifact.tmp-{gone}-file",
            "live": f".artifact.tmp-{alive.pid}-abcd1234",
            "other-destination": f".other.tmp-{gone}-abcd1234",
            "no-pid": ".artifact.tmp-abcd1234",
        }
        for key, name in names.items():
            if key == "dead-file":
                (tmp_path / name).write_bytes(b"partial")
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        with atomic_dir(dest) as tmp:
            (tmp / "x").write_text("new")
        left = {p.name for p in tmp_path.iterdir()}
        assert names["dead"] not in left and names["dead-file"] not in left
        assert names["own-pid-unregistered"] not in left  # a PID reused after a restart
        assert {names["live"], names["other-destination"], names["no-pid"]} <= left
        assert (dest / "x").read_text() == "new"
    finally:
        alive.kill()
        alive.wait()


def test_artifact_left_aside_by_a_dead_writer_is_put_back(tmp_path, monkeypatch):
    """SIGKILL between the two renames: the previous artifact sits in .NAME.old-PID-*. The next
    write puts it back first, so even a failing write leaves it in place."""
    dest = tmp_path / "artifact"
    aside = tmp_path / f".artifact.old-{dead_pid()}-abcd1234"
    aside.mkdir()
    (aside / "x").write_text("previous")
    with pytest.raises(CfspError, match="could not write"), atomic_dir(dest) as tmp:
        (tmp / "x").write_text("new")
        raise OSError(28, "No space left on device")
    assert (dest / "x").read_text() == "previous" and hidden(tmp_path) == []
    write_json(tmp_path / "metrics.json", {"a": 1})
    stale = tmp_path / f".metrics.json.tmp-{dead_pid()}-abcd"
    stale.write_text("{")
    write_json(tmp_path / "metrics.json", {"a": 2})
    assert not stale.exists() and hidden(tmp_path) == []


# -- signals at exact moments ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "point,sig,code",
    [
        ("export", "TERM", 143),
        ("export", "INT", 130),
        ("export", "HUP", 129),
        ("load", "TERM", 143),
        ("publish", "TERM", 143),
    ],
    ids=["term-export", "int-export", "hup-export", "term-load", "term-publish"],
)
def test_signal_during_prune_leaves_the_previous_checkpoint(proj, ckpt, point, sig, code):
    before = snapshot(ckpt)
    proc = run_cli(
        *prune_args(proj, ckpt, "--budget", "0.5", "--overwrite"),
        CFSP_FAULT_SIGNAL_AT=point,
        CFSP_FAULT_SIGNAL=sig,
    )
    assert proc.returncode == code, proc.stderr[-3000:]
    one_interrupted_line(proc.stderr, f"SIG{sig}")
    assert snapshot(ckpt) == before and hidden(ckpt.parent) == []


@pytest.mark.parametrize("point", ["export", "publish"])
def test_sigkill_mid_write_is_cleaned_by_the_next_run(proj, ckpt, point):
    args = prune_args(proj, ckpt, "--budget", "0.5", "--overwrite")
    proc = run_cli(*args, CFSP_FAULT_SIGNAL_AT=point, CFSP_FAULT_SIGNAL="KILL")
    assert proc.returncode == -signal.SIGKILL
    left = hidden(ckpt.parent)
    kind = "tmp" if point == "export" else "old"
    assert len(left) == (1 if point == "export" else 2) and any(f".ckpt.{kind}-" in n for n in left)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hidden(ckpt.parent) == []
    assert run_cli("verify", ckpt).returncode == 0


# -- real full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_disk_during_export(proj, small_disk, capsys):
    target = small_disk / "ckpt"
    shutil.copytree(proj / "ckpt", target)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # 64 KiB left
    before = snapshot(target)
    code, _, err = cli(capsys, *prune_args(proj, target, "--budget", "0.5", "--overwrite"))
    line = error_line(err)
    assert code == 1 and f"could not write {target}" in line and "No space left" in line, line
    assert snapshot(target) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt", "filler"]


def test_file_size_limit_during_export(proj, ckpt):
    """`ulimit -f`: the kernel sends SIGXFSZ, which would kill the process mid-write; cfsp
    ignores it, so the write fails with EFBIG and is reported like a full disk."""
    before = snapshot(ckpt)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))"
    code = f"{limit}; from cfsp.cli import entry; entry()"
    args = [str(a) for a in prune_args(proj, ckpt, "--budget", "0.5", "--overwrite")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    # The first write over 32 KiB fails: the streamed engine's per-block statistics spill
    # (under TMPDIR) or the checkpoint itself; either way one line, and the old one intact.
    spill = r"\S*/cfsp-stats-[^/]+/grams/block-\d+\.safetensors"
    assert re.match(rf"error: could not write ({spill}|{re.escape(str(ckpt))})\S*: ", line), line
    assert "File too large" in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(ckpt) == before and hidden(ckpt.parent) == []


# -- concurrency ----------------------------------------------------------------------------------
def test_verify_while_the_checkpoint_is_replaced(ckpt, tmp_path):
    """A verify racing an `--overwrite` of identical content never reports a mix of two
    versions as a verdict: it says intact, or that the checkpoint kept changing."""
    source = tmp_path / "source"
    shutil.copytree(ckpt, source)
    stop = threading.Event()

    def republish():
        while not stop.is_set():
            with atomic_dir(ckpt) as tmp:
                for f in source.iterdir():
                    shutil.copy(f, tmp / f.name)

    writer = threading.Thread(target=republish)
    writer.start()
    verdicts = []
    try:
        for _ in range(30):
            try:
                verdicts.append(verify_checkpoint(ckpt))
            except CfspError as err:
                assert "kept changing while it was verified" in str(err)
                verdicts.append("changing")
    finally:
        stop.set()
        writer.join()
    assert all(v in ([], "changing") for v in verdicts), verdicts
    assert [] in verdicts and hidden(tmp_path) == []


def test_non_directory_check_is_one_stat(tmp_path):
    """The verify's first check reads the path once (exists-then-is_dir saw a checkpoint being
    replaced as present, then as "not a directory": a false usage error, seen once in CI)."""
    from cfsp.export import _names_a_non_directory

    (tmp_path / "file").write_text("x")
    assert _names_a_non_directory(tmp_path / "file")
    assert not _names_a_non_directory(tmp_path)
    assert not _names_a_non_directory(tmp_path / "missing")
    assert not _names_a_non_directory(tmp_path / "file" / "below")  # parent is a file


def test_two_runs_started_together_in_a_fresh_folder(proj, tmp_path):
    """Both create the MLflow sqlite database and its experiment (a schema-migration race
    without the file lock: "Online migration expected to match one row") and both succeed.
    (Their two Prefect servers share PREFECT_HOME's sqlite database; under load one of them
    was seen, once in seven runs, to log a sqlalchemy traceback it recovered from: that is
    Prefect's server log, so this test checks exit codes, outputs and `error:` lines.)"""
    params = params_in(proj, tmp_path)
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    procs = [spawn_cli("run", "--params", params, cwd=tmp_path, **env) for _ in range(2)]
    try:
        results = [p.communicate(timeout=480) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "checkpoint tiny-p0.3-cfsp:" in out
        assert not [ln for ln in err.splitlines() if ln.startswith("error:")], err[-3000:]
    checkpoint = next(line for line in out.splitlines() if line.startswith("checkpoint "))
    assert verify_checkpoint(checkpoint.split(": ", 1)[1]) == []


# -- exposure -------------------------------------------------------------------------------------
def test_dask_local_cluster_listens_on_loopback_only():
    pytest.importorskip("prefect_dask")
    from cfsp.config import Params
    from flows.compress import task_runner

    process = psutil.Process()

    def listening() -> set:
        return {
            (c.laddr.ip, c.laddr.port)
            for c in process.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }

    before = listening()
    with task_runner(Params(runner={"kind": "dask"})) as runner:
        assert runner.client is not None  # starts the local cluster
        opened = listening() - before
    assert opened, "the cluster opened no listening socket"
    assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened


def _prefect_objects() -> list:
    import importlib

    from prefect import Flow
    from prefect.tasks import Task

    found = []
    folders = {"cfsp/pipeline": "cfsp.pipeline", "tasks": "tasks", "flows": "flows"}
    for folder, package in folders.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            module = importlib.import_module(f"{package}.{path.stem}")
            values = list(vars(module).items())
            values += [(n, t) for n, t in getattr(module, "TASKS", {}).items()]  # registry-built
            found += [
                (f"{package}.{path.stem}.{name}", obj)
                for name, obj in values
                if isinstance(obj, Task | Flow) and obj.__module__ == module.__name__
            ]
    return found


def test_every_task_and_flow_persists_json_or_nothing():
    """With PREFECT_RESULTS_PERSIST_BY_DEFAULT=true (cfsp's setting) a task or flow without an
    explicit choice persists its result with pickle."""
    objects = _prefect_objects()
    names = {name.rsplit(".", 1)[1] for name, _ in objects}
    assert {"prepare", "track", "sweep", "compress", "benchmark", "suite_task"} <= names
    for name, obj in objects:
        assert obj.persist_result is not None, f"{name}: persist_result left to the default"
        assert obj.result_serializer == "json", f"{name}: {obj.result_serializer!r}"


# -- servers and schedules ------------------------------------------------------------------------
@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_dashboard_port_out_of_range(proj, capsys, port):
    start = time.monotonic()
    code, _, err = cli(capsys, "dashboard", "--params", proj / "params.yaml", "--port", port)
    assert code == 2 and f"--port {port} is not a TCP port; use 1-65535" in error_line(err)
    assert time.monotonic() - start < 5


def test_dashboard_on_a_busy_port(proj, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = cli(capsys, "dashboard", "--params", proj / "params.yaml", "--port", port)
    assert code == 1 and f"port {port} on 127.0.0.1 is already in use" in error_line(err)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError("timed out")


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def _all_gone(procs: list[psutil.Process], timeout: float = 15) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_dashboard_sigterm_stops_its_mlflow_server(proj, tmp_path):
    port = free_port()
    proc = spawn_cli("dashboard", "--params", proj / "params.yaml", "--port", port, cwd=tmp_path)
    try:

        def serving() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        _wait_for(serving, 240, proc)
        children = _descendants(proc.pid)
        assert children
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    one_interrupted_line(err, "SIGTERM")
    assert _all_gone(children) == []


@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *", ""])
def test_serve_with_an_invalid_cron(proj, capsys, monkeypatch, cron):
    for key in ("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "PREFECT_SERVER_API_HOST"):
        monkeypatch.delenv(key, raising=False)  # restored after configure_prefect sets them
    code, _, err = cli(capsys, "serve", "--cron", cron, "--params", proj / "params.yaml")
    line = error_line(err)
    assert code == 2 and f"invalid --cron {cron!r}" in line and "'0 3 * * *'" in line


@pytest.mark.parametrize(
    "command,variable,value,match",
    [
        ("run", "PREFECT_HOME", "FILE", "PREFECT_HOME=FILE is not a directory"),
        ("serve", "PREFECT_HOME", "FILE", "PREFECT_HOME=FILE is not a directory"),
        ("run", "PREFECT_HOME", "FILE/sub", "PREFECT_HOME=FILE/sub cannot be used (Not a direc"),
        ("run", "PREFECT_HOME", "/proc/cfsp-prefect", "cannot be used"),
        ("run", "PREFECT_API_URL", "not a url", "is not an http(s) URL of a Prefect server"),
        ("run", "PREFECT_API_URL", "ftp://127.0.0.1/api", "is not an http(s) URL"),
        ("run", "PREFECT_API_URL", "http://127.0.0.1:99999/api", "is not a valid URL (Port"),
        ("run", "MLFLOW_TRACKING_URI", "nonsense://x", "has an unknown scheme 'nonsense'"),
        ("run", "MLFLOW_TRACKING_URI", "sqlite:///", "names no database file"),
        ("run", "MLFLOW_TRACKING_URI", "sqlite:///:memory:", "names no database file"),
    ],
    ids=[
        "home-file-run",
        "home-file-serve",
        "home-under-file",
        "home-unwritable",
        "api-not-url",
        "api-ftp",
        "api-bad-port",
        "mlflow-scheme",
        "mlflow-sqlite-empty",
        "mlflow-sqlite-memory",
    ],
)
def test_odd_environment_fails_before_any_work(
    proj, tmp_path, capsys, monkeypatch, command, variable, value, match
):
    plain = tmp_path / "plainfile"
    plain.write_text("not a folder\n")
    value, match = value.replace("FILE", str(plain)), match.replace("FILE", str(plain))
    for key in ("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "PREFECT_SERVER_API_HOST", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(variable, value)
    params = params_in(proj, tmp_path)
    extra = ["--cron", "0 3 * * *"] if command == "serve" else []
    start = time.monotonic()
    code, _, err = cli(capsys, command, "--params", params, *extra)
    assert code == 2 and match in error_line(err)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists() and plain.read_text() == "not a folder\n"


# -- cfsp run: Prefect's temporary server ---------------------------------------------------------
def test_sigterm_to_a_run_stops_prefect_temporary_server(proj, tmp_path):
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    proc = spawn_cli("run", "--params", params_in(proj, tmp_path), cwd=tmp_path, **env)
    try:

        def server_started() -> bool:
            return any("uvicorn" in " ".join(p.cmdline()) for p in _descendants(proc.pid))

        _wait_for(server_started, 240, proc)
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    one_interrupted_line(err, "SIGTERM")
    assert _all_gone(children) == []
    out = tmp_path / "out"
    assert [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name] == []
