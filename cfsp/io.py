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
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cfsp.errors import CfspError, UsageError
from cfsp.faults import signal_point


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(check_regular_file(path), "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Names of the files that mark a folder as a cfsp output (a checkpoint, or a stage's output).
OUTPUT_MARKERS = (
    "cfsp_manifest.json",
    "prepare.json",
    "capture.json",
    "allocation.json",
    "evaluate.json",
)
# Published files: readable by everyone, writable by the owner (directories get 0755).
FILE_MODE = 0o644
# A temporary name adds `.NAME.tmp-XXXXXXXX` (or `.old-`) to an output's name.
_TEMP_NAME_EXTRA = 16


def check_regular_file(path: str | Path, what: str = "") -> Path:
    """Refuse anything but a regular file (after symlinks) before it is opened.

    Opening a FIFO blocks until a writer appears (forever), and a device such as /dev/zero
    never ends; only regular files are read as weights, tokens, manifests, params or text.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise UsageError(f"{name} is a dangling symbolic link") from None
        raise UsageError(f"{name} does not exist") from None
    except OSError as err:
        raise UsageError(f"{name} cannot be read: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        raise UsageError(f"{name} is {_kind(mode)}, not a regular file")
    return path


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _protected(path: Path) -> str | None:
    """Why `path` must never be replaced by an output: the root, home, the working directory
    or a folder above it (replacing one deletes what the user is standing in)."""
    real = path.resolve()
    if real == Path(real.anchor):
        return "the root directory"
    if real == Path.home().resolve():
        return "the home directory"
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing to protect there
        return None
    if real == cwd or real in cwd.parents:
        return "the current directory" if real == cwd else "a parent of the current directory"
    return None


def check_output_path(path: str | Path) -> Path:
    """The checks every output shares, by name and type only (nothing is created).

    An output path must not be a symbolic link (dangling, or pointing at another artifact that
    the rename would not replace), nor a protected folder, and every name must leave room for
    the temporary name it is written under (or the write fails after all the work).
    """
    path = Path(path).expanduser().absolute()
    limit = _name_max(path)
    for part in path.parts[1:]:  # first: a stat of an over-long name fails with ENAMETOOLONG
        if len(part.encode()) + _TEMP_NAME_EXTRA > limit:
            raise UsageError(
                f"output location {path}: the name {part[:24]}... has {len(part.encode())} "
                f"bytes; at most {limit - _TEMP_NAME_EXTRA} are allowed (file names are limited "
                f"to {limit} and cfsp writes under a temporary name first)"
            )
    if path.is_symlink():
        target = os.readlink(path)
        state = "dangling " if not path.exists() else ""
        raise UsageError(
            f"output location {path} is a {state}symbolic link (to {target}); give a real path"
        )
    reason = _protected(path)
    if reason:
        raise UsageError(f"output location {path} is {reason}; cfsp never replaces it")
    return path


def _name_max(path: Path) -> int:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable_parent(path: str | Path) -> Path:
    """Fail early, before any work, if `path` cannot be created."""
    path = check_output_path(path)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"output location {path} is not writable ({parent} is not a directory)")
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


def check_output_file(path: str | Path) -> Path:
    """`check_writable_parent` for a file output: an existing folder there is refused now,
    not after the work, when the final rename would fail."""
    path = check_writable_parent(path)
    if path.is_dir():
        raise UsageError(f"output file {path} is an existing directory; give a file name")
    return path


def check_replaceable(path: str | Path) -> Path:
    """An existing output folder may be replaced only if it is empty or a cfsp output.

    `--overwrite` (and every stage, which always replaces its output) deletes the old folder;
    a folder without a cfsp marker file is someone's data, and is never deleted.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        return path
    if not path.is_dir():
        raise UsageError(f"output location {path} exists and is not a directory")
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as err:
        raise UsageError(f"output location {path} cannot be listed: {err.strerror}") from err
    if names and not names.intersection(OUTPUT_MARKERS):
        raise UsageError(
            f"{path} is not empty and is not a cfsp output (no {OUTPUT_MARKERS[0]}); cfsp "
            "replaces only its own outputs or an empty folder, even with --overwrite: choose "
            "another --out"
        )
    return path


def check_output_dir(path: str | Path) -> Path:
    """`check_writable_parent` and `check_replaceable`: a folder output that may be written."""
    return check_replaceable(check_writable_parent(path))


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


def publish_modes(folder: Path) -> None:
    """Make every regular file in `folder` FILE_MODE: writers that go through their own
    temporary files (safetensors) leave them 0600, unreadable by another user or container."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(FILE_MODE)


def _make_temp(dest: Path, kind: str, directory: bool = True) -> Path:
    """Create and register `.NAME.KIND-PID-XXXX` next to `dest` in one step, so a sweep by
    another thread never sees it unregistered."""
    prefix = f".{dest.name}.{kind}-{os.getpid()}-"
    with _LIVE_LOCK:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
            os.fchmod(fd, FILE_MODE)  # mkstemp makes it private; a published file is not
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
        publish_modes(tmp)
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
    dest = check_output_file(dest)
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


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """Parse a JSON file; with `expect` (dict, list), refuse any other top-level structure
    now rather than fail later with a KeyError or AttributeError deep inside a stage."""
    path = check_regular_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CfspError(f"{path} is not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise CfspError(f"{path} is not valid JSON: {err}") from err
    if expect is not None and not isinstance(data, expect):
        names = {dict: "a JSON object", list: "a JSON array"}
        raise CfspError(
            f"{path} holds {_json_kind(data)}, expected {names.get(expect, expect.__name__)}"
        )
    return data


def _json_kind(data: Any) -> str:
    kinds = {dict: "a JSON object", list: "a JSON array", str: "a string", bool: "a boolean"}
    if data is None:
        return "null"
    return kinds.get(type(data), "a number")


def parse_shard_size(text: str | int) -> int:
    """Bytes from a shard size: an integer, or a number with KB/MB/GB/TB (powers of 1000, as
    transformers reads them). Weight files are split so that none exceeds it (a single tensor
    larger than it gets a file of its own)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", str(text), re.IGNORECASE)
    unit = (match.group(2) or "B").upper() if match else "B"
    size = int(float(match.group(1)) * 1000 ** "BKMGT".index(unit[0])) if match else 0
    if size < 1:
        raise UsageError(
            f"max shard size {text!r} is not a positive size such as 2GB, 500MB or 1000000"
        )
    return size


def as_os_error(err: Exception, path: str | Path) -> OSError | None:
    """The OSError inside a safetensors write failure ("... I/O error: No space left on device
    (os error 28)"), so callers report a full disk as one line, as any other failed write."""
    code = re.search(r"os error (\d+)", str(err))
    if code is None:
        return None
    number = int(code.group(1))
    return OSError(number, os.strerror(number), str(path))


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        os_error = as_os_error(err, path)
        if os_error is None:
            raise
        raise os_error from err
