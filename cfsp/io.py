"""Atomic artifact writing, hashing and safetensors helpers.

Every artifact is first written under a temporary name in the destination's own directory and
then renamed into place, so a killed run never leaves a half-written file where a finished one
is expected, and a failed run leaves an existing artifact untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfsp.errors import CfspError, UsageError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_writable_parent(path: str | Path) -> Path:
    """Fail early, before any work, if `path` cannot be created."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: os.access says yes to root even where writes fail (/proc, read-only)
        probe = tempfile.mkdtemp(prefix=".cfsp-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise UsageError(
            f"output location {path} is not writable ({parent}: {err.strerror})"
        ) from err
    if path.suffix == "" and path.is_file():  # one stat: a concurrent writer may be renaming it
        raise UsageError(f"output location {path} exists and is not a directory")
    return path


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `dest` only if the block succeeds."""
    dest = check_writable_parent(dest)
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists; pass --overwrite or choose another --out")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a published artifact is not
    except OSError as err:
        raise CfspError(f"cannot create output directory next to {dest}: {err}") from err
    try:
        yield tmp
        _publish(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CfspError(f"could not write {dest}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dest: Path, attempts: int = 100) -> None:
    """Rename the finished `tmp` to `dest`.

    A directory cannot replace a non-empty one in one rename, so an existing `dest` is first
    renamed aside (to a unique name) and removed afterwards; if the final rename fails, it is
    put back. When another writer publishes `dest` in between, try again: concurrent writers of
    one artifact all succeed, the last one wins, and no temporary name is left behind.
    """
    for _ in range(attempts):
        aside = None
        if dest.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            try:
                os.replace(dest, aside)  # onto an empty directory: allowed
            except FileNotFoundError:  # another writer moved it first
                os.rmdir(aside)
                continue
        try:
            os.replace(tmp, dest)
            return
        except OSError as err:
            if aside is not None and not dest.exists():
                with contextlib.suppress(OSError):
                    os.replace(aside, dest)  # put the previous artifact back
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if aside is not None and aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, f"{attempts} concurrent writers kept replacing it", str(dest))


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to `dest` only if the block succeeds."""
    dest = check_writable_parent(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
        os.close(fd)
    except OSError as err:
        raise CfspError(f"cannot write {dest}: {err}") from err
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CfspError(f"could not write {dest}: {err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(dest: str | Path, payload: Any) -> Path:
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return Path(dest)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CfspError(f"{path} is not valid JSON: {err}") from err
