"""Atomic artifact writing, hashing and safetensors helpers.

Every artifact is first written under a temporary name in the destination's own directory and
then renamed into place, so a killed run never leaves a half-written file where a finished one
is expected, and a failed run leaves an existing artifact untouched.

Temporary names carry the writer's PID (`.NAME.tmp-PID-XXXX`, `.NAME.old-PID-XXXX`): a process
killed with SIGKILL cannot clean up after itself, so the next write to the same destination
removes the temporaries of writers that are gone (and puts back a previous artifact that a
kill left aside). Live temporaries of this process are registered, so an interrupt handler can
remove the ones other threads are still writing (`remove_live_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfsp.errors import CfspError, UsageError
from cfsp.faults import signal_point


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


_LIVE: set[Path] = set()  # temporaries this process is writing right now
_LIVE_LOCK = threading.Lock()


def _unregister(path: Path) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(path)


def remove_live_temporaries() -> None:
    """Delete every temporary this process is still writing (called on SIGTERM/SIGINT, when
    worker threads will not get to their own clean-up)."""
    with _LIVE_LOCK:
        paths = sorted(_LIVE)
        _LIVE.clear()
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _make_temp(dest: Path, kind: str, directory: bool = True) -> Path:
    """Create and register `.NAME.KIND-PID-XXXX` next to `dest` in one step, so a sweep by
    another thread never sees it unregistered."""
    prefix = f".{dest.name}.{kind}-{os.getpid()}-"
    with _LIVE_LOCK:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
            os.close(fd)
            path = Path(name)
        _LIVE.add(path)
    return path


def _writer_pid(name: str, dest: Path, kind: str) -> int | None:
    """The PID recorded in a temporary name of `dest`, or None if `name` is not one."""
    prefix = f".{dest.name}.{kind}-"
    pid, sep, _ = name[len(prefix) :].partition("-") if name.startswith(prefix) else ("", "", "")
    return int(pid) if sep and pid.isdigit() else None


def _process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as gone: it writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(path: Path, pid: int) -> bool:
    """Left by a writer that is gone: a dead PID, or this PID but not one of our temporaries
    (the PID was reused, e.g. after a container restart)."""
    if pid == os.getpid():
        with _LIVE_LOCK:
            return path not in _LIVE
    return not _process_alive(pid)


def remove_stale_temporaries(dest: str | Path) -> list[str]:
    """Remove `dest`'s temporaries left by dead writers; returns their names.

    A `.NAME.old-PID-*` whose writer died between its two renames holds the previous artifact:
    it is put back when `dest` is missing, so a later failure cannot lose it.
    """
    dest = Path(dest)
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return []
    removed = []
    for kind in ("old", "tmp"):  # an old artifact goes back first, before any tmp is judged
        for path in entries:
            pid = _writer_pid(path.name, dest, kind)
            if pid is None or not _is_stale(path, pid):
                continue
            if kind == "old" and not dest.exists():
                with contextlib.suppress(OSError):
                    os.replace(path, dest)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path.name)
    return removed


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `dest` only if the block succeeds."""
    dest = check_writable_parent(dest)
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists; pass --overwrite or choose another --out")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        tmp = _make_temp(dest, "tmp")
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
    finally:
        _unregister(tmp)


def _publish(tmp: Path, dest: Path, attempts: int = 100) -> None:
    """Rename the finished `tmp` to `dest`.

    A directory cannot replace a non-empty one in one rename, so an existing `dest` is first
    renamed aside (to a unique name) and removed afterwards; if the final rename fails, or an
    interrupt (SIGTERM, Ctrl-C) lands in between, it is put back. When another writer publishes
    `dest` in between, try again: concurrent writers of one artifact all succeed, the last one
    wins, and no temporary name is left behind.
    """
    for _ in range(attempts):
        aside = None
        if dest.exists():
            aside = _make_temp(dest, "old")
            try:
                os.replace(dest, aside)  # onto an empty directory: allowed
            except FileNotFoundError:  # another writer moved it first
                os.rmdir(aside)
                _unregister(aside)
                continue
        published = False
        try:
            if aside is not None:
                signal_point("publish")  # tests only: an interrupt between the two renames
            os.replace(tmp, dest)
            published = True
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if aside is not None:
                if not published and not dest.exists():
                    with contextlib.suppress(OSError):
                        os.replace(aside, dest)  # put the previous artifact back
                if aside.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                _unregister(aside)
    raise OSError(errno.EBUSY, f"{attempts} concurrent writers kept replacing it", str(dest))


@contextlib.contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to `dest` only if the block succeeds."""
    dest = check_writable_parent(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        tmp = _make_temp(dest, "tmp", directory=False)
    except OSError as err:
        raise CfspError(f"cannot write {dest}: {err}") from err
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CfspError(f"could not write {dest}: {err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _unregister(tmp)


def write_json(dest: str | Path, payload: Any) -> Path:
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return Path(dest)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CfspError(f"{path} is not valid JSON: {err}") from err
