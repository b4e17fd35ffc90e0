"""What a user reads and installs: the lock, `--version`, `--help`, and progress output on a
terminal and in a log."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import TEXT, tiny_model

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
RELOCK = "run `bash scripts/lock.sh` in the tested .venv and commit constraints.txt"


def _lock() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.!]*", line), line
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = Version(pinned)
    return pins


def _declared() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]


# -- the lock -------------------------------------------------------------------------------------
def test_every_declared_dependency_is_locked_within_its_bounds():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked; {RELOCK}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {req.name}=={pins[name]}, outside pyproject's {req}; {RELOCK}"
        )
    assert "cfsp" not in pins and "pip" not in pins
    assert {"setuptools", "torch", "transformers"} <= set(pins)  # setuptools: torch imports it


def test_the_tested_environment_is_the_locked_one():
    """CI installs from the lock (scripts/setup.sh), so every locked package is installed at
    exactly its locked version; a mismatch means the lock is stale or was not used."""
    wrong = []
    for name, pinned in _lock().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            wrong.append(f"{name}: locked {pinned}, not installed")
            continue
        if Version(installed.public) != pinned:  # torch 2.13.0+cpu satisfies torch==2.13.0
            wrong.append(f"{name}: locked {pinned}, installed {installed}")
    assert not wrong, f"{'; '.join(wrong)}; {RELOCK}"


def _lock_script_in(folder: Path) -> Path:
    """A copy of scripts/lock.sh in `folder`/scripts: it works on `folder` as its repository."""
    (folder / "scripts").mkdir()
    script = folder / "scripts" / "lock.sh"
    script.write_text((ROOT / "scripts" / "lock.sh").read_text())
    return script


def test_lock_script_refuses_what_it_cannot_lock(tmp_path):
    script = _lock_script_in(tmp_path)
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith("error: no .venv here"), run.stderr
    # A stand-in interpreter that reports one package installed from a URL: not lockable.
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'numpy==2.0.0'; echo 'mypkg @ file:///tmp/mypkg'\n")
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "mypkg @ file:///tmp/mypkg" in run.stderr, run.stderr
    assert not (tmp_path / "constraints.txt").exists()  # nothing half-written
    run = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown argument --bogus" in run.stderr


FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$PIP_LOG"
case "$*" in
  *"import torch"*) [ -z "$NO_TORCH" ] ;;
  *"-e .[dev]"*) if [ -n "$FAIL" ]; then echo "ERROR: no matching distribution" >&2; exit 1; fi ;;
esac
"""


def _setup_with_a_stand_in_pip(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a copy of scripts/setup.sh whose .venv/bin/python only logs its arguments (and
    fails the cfsp install when FAIL is set): what setup.sh asks pip to do, without pip."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    (tmp_path / "constraints.txt").write_text(LOCK.read_text())
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    run = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PIP_LOG=str(log), **env),
    )  # fmt: skip
    return run, log.read_text().splitlines()


def test_setup_installs_from_the_lock(tmp_path):
    run, calls = _setup_with_a_stand_in_pip(tmp_path)
    assert run.returncode == 0, run.stderr
    assert "-m pip install -q -c constraints.txt -e .[dev]" in calls


def test_setup_with_another_torch_leaves_out_the_locked_torch(tmp_path):
    spec = "torch==2.4.1 --index-url http://127.0.0.1:9/simple"
    run, calls = _setup_with_a_stand_in_pip(tmp_path, NO_TORCH="1", CFSP_TORCH=spec)
    assert run.returncode == 0, run.stderr
    torch_call = next(c for c in calls if c.endswith(spec))
    lock = torch_call.split(" -c ", 1)[1].split()[0]
    assert lock != "constraints.txt" and not Path(lock).exists()  # a temporary copy, removed


def test_setup_fails_when_pip_fails(tmp_path):
    run, _ = _setup_with_a_stand_in_pip(tmp_path, FAIL="1")
    assert run.returncode == 1 and "ERROR: no matching distribution" in run.stdout + run.stderr


# -- version and help -----------------------------------------------------------------------------
def _cfsp(*args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "cfsp.cli", *args], env=env, timeout=300, **kwargs)


def test_version_names_cfsp_and_the_libraries_behind_the_numbers():
    import torch
    import transformers

    from cfsp import __version__

    proc = _cfsp("--version", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"cfsp {__version__}"
    for expected in (f"torch {torch.__version__}", f"transformers {transformers.__version__}"):
        assert expected in lines
    assert {line.split()[0] for line in lines} >= {"python", "prefect", "mlflow", "dvc", "lm_eval"}
    assert _cfsp("version", capture_output=True, text=True).stdout == proc.stdout


def _command_paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


def test_no_help_shows_a_bool_metavar():
    import typer
    from typer.testing import CliRunner

    from cfsp.cli import app

    paths = list(_command_paths(typer.main.get_command(app)))
    assert ("prune",) in paths and ("stage", "recover") in paths and len(paths) > 15
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output and "<bool>" not in result.output, (path, result.output)
    flags = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert "--speed / --no-speed" in flags and "--trust-remote-code " in flags


# -- progress output ------------------------------------------------------------------------------
@pytest.fixture
def tiny_prune_args(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    return [
        "prune", "--model", str(model_dir), "--calib", f"file:{tmp_path / 'text.txt'}",
        "--nsamples", "4", "--seqlen", "16", "--out", str(tmp_path / "pruned"),
    ]  # fmt: skip


def test_a_log_gets_lines_without_progress_bars(tiny_prune_args, tmp_path):
    proc = _cfsp(*tiny_prune_args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "INFO stream pass 1 block  0" in proc.stderr  # cfsp's own per-block progress lines
    assert "\r" not in proc.stderr + proc.stdout, proc.stderr
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr
    assert proc.stdout.startswith(f"{tmp_path / 'pruned'}: removed")  # where the checkpoint is


def test_a_log_gets_no_bars_from_libraries_either():
    """A library bar that leaves `disable` unset (lm-eval builds its requests under one) is
    off once cfsp's logging is set up on a non-terminal stderr."""
    code = (
        "from cfsp.logs import setup_logging; setup_logging()\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(3), desc='library bar'): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "library bar" not in proc.stderr and "\r" not in proc.stderr, proc.stderr


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: colour codes dropped, `\\r` returns to column 0
    and later characters overwrite earlier ones (what a bar redraw and clear rely on)."""
    lines, row, col = [[]], 0, 0
    for char in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw):
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append([])
            row, col = row + 1, 0
        else:
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
    return ["".join(line).rstrip() for line in lines]


def _run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run `cfsp ARGS` with stdout and stderr on a 200-column pseudo-terminal; read as it
    writes (a full terminal buffer would block it)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("COLUMNS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfsp.cli", *args],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    try:
        while select.select([leader], [], [], 300)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal and all was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_on_a_terminal_bars_and_log_lines_never_share_a_line(tiny_prune_args):
    code, raw = _run_on_a_terminal(tiny_prune_args)
    assert code == 0, raw
    screen = _screen(raw)
    bars = [line for line in screen if line.startswith("pass 1:")]
    logs = [line for line in screen if "stream pass 1 block" in line]
    assert bars and "\r" in raw, raw  # a terminal does get the bar
    assert len(logs) == 2, screen  # one line per block of the tiny model
    assert all("%|" not in line for line in logs), screen
    assert "Loading weights" not in raw
