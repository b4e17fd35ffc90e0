"""DVC for real: the repository's own dvc.yaml / params.yaml / .dvc/config as DVC reads them,
the default local-folder remote, and an S3-compatible server (moto) on 127.0.0.1, each
round-tripping a tiny pruned checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfsp.export import verify_checkpoint
from cfsp.io import sha256_file

pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (pip install -e '.[dev]')")
moto_server = pytest.importorskip(
    "moto.moto_server.threaded_moto_server", reason="moto[server] is not installed"
)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "cfsp-test"


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """Dummy credentials, no shared AWS config files, nothing proxied: only 127.0.0.1 is used."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    return env


@pytest.fixture
def s3_server(s3_env):
    """A moto S3 server in a thread on 127.0.0.1 (a free port), with an empty bucket."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command from this venv (dvc, git, cfsp); fail the test with its output if it fails.
    DVC_NO_ANALYTICS: `dvc init` runs before the copied config turns analytics off."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, DVC_NO_ANALYTICS="1")
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def tracked_checkpoint(tiny_project, tmp_path_factory):
    """A git + DVC repository with the project's .dvc/config and a `dvc add`-ed tiny pruned
    checkpoint. The default remote (../cfsp-dvc-remote) lands beside the repository."""
    repo = tmp_path_factory.mktemp("dvc-remote") / "repo"
    repo.mkdir()
    for name in ("tiny", "text.txt"):
        src = tiny_project / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    _run(
        repo, sys.executable, "-m", "cfsp.cli", "prune", "--model", "tiny",
        "--budget", "0.4", "--calib", "file:text.txt", "--nsamples", "8", "--seqlen", "16",
        "--out", "pruned",
    )  # fmt: skip
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "config", "user.email", "t@t")
    _run(repo, "git", "config", "user.name", "t")
    _run(repo, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc/config", repo / ".dvc/config")
    _run(repo, "dvc", "add", "-q", "pruned")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tracked checkpoint")
    return repo


def test_dvc_reads_the_projects_own_files():
    """`dvc stage list` parses params.yaml with DVC's own YAML reader (stricter than PyYAML:
    an unquoted `[botchan:test]` broke every dvc command); metrics and plots are git-tracked."""
    listed = _run(REPO, "dvc", "stage", "list").stdout
    assert "evaluate-dense@" in listed and "Reports metrics/" in listed
    remotes = _run(REPO, "dvc", "remote", "list").stdout.split()
    assert remotes[:3] == ["local", str(REPO.parent / "cfsp-dvc-remote"), "(default)"]
    probe = ["git", "check-ignore", "metrics/m/x.json", "plots/m/x/keep.csv"]
    ignored = subprocess.run(probe, cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 1, f"git-ignored, so experiments would lose it: {ignored.stdout}"


def _forget_and_pull(repo: Path, *remote: str) -> dict[str, str]:
    """Delete the checkpoint and the local cache, pull it back; its files' digests."""
    shutil.rmtree(repo / "pruned")
    shutil.rmtree(repo / ".dvc/cache")
    _run(repo, "dvc", "pull", *remote)
    return _digests(repo / "pruned")


def test_default_remote_is_a_local_folder_beside_the_repo(tracked_checkpoint):
    repo = tracked_checkpoint
    listed = _run(repo, "dvc", "remote", "list").stdout.split()
    assert listed[:3] == ["local", str(repo.parent / "cfsp-dvc-remote"), "(default)"]
    before = _digests(repo / "pruned")
    assert "model.safetensors" in before and "cfsp_manifest.json" in before
    _run(repo, "dvc", "push")
    assert any((repo.parent / "cfsp-dvc-remote/files/md5").rglob("*"))
    assert _forget_and_pull(repo) == before


def test_push_and_pull_through_an_s3_server_on_localhost(tracked_checkpoint, s3_server):
    import boto3

    repo = tracked_checkpoint
    # What the README tells a team to do (credentials come from the environment).
    _run(repo, "dvc", "remote", "add", "s3", f"s3://{BUCKET}/cfsp")
    _run(repo, "dvc", "remote", "modify", "s3", "endpointurl", s3_server)
    before = _digests(repo / "pruned")
    _run(repo, "dvc", "push", "-r", "s3")
    stored = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=BUCKET)
    keys = [o["Key"] for o in stored.get("Contents", [])]
    assert keys and all(k.startswith("cfsp/files/md5/") for k in keys)
    assert not (repo.parent / "cfsp-dvc-remote").exists()  # nothing went to the default remote

    assert _forget_and_pull(repo, "-r", "s3") == before
    assert verify_checkpoint(repo / "pruned") == []
