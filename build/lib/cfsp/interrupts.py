"""SIGTERM, SIGINT and SIGHUP end a cfsp command the same clean way.

Python's default SIGTERM kills the process on the spot: no `finally` runs, so a checkpoint
being written stays behind as a `.NAME.tmp-*` folder and Prefect's temporary server (a child
process stopped by an atexit hook) is orphaned. Here each of these signals raises `Interrupted`
in the main thread instead; the stack unwinds through `atomic_dir`/`atomic_file` (which delete
their temporaries), the CLI prints one `interrupted (SIGTERM)` line and exits 128 + the signal
number: 143 for SIGTERM, 130 for SIGINT (Ctrl-C), 129 for SIGHUP.

SIGXFSZ (a file-size limit, `ulimit -f`) is ignored so that the write fails with EFBIG, an
OSError that is reported like a full disk, instead of killing the process mid-write.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):  # noqa: N818 - a signal, not an error
    """A termination signal arrived. BaseException, like KeyboardInterrupt: no `except
    Exception` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted ({signal.Signals(signum).name})")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum: int, frame) -> None:
    for sig in HANDLED:  # the first signal starts the clean-up; later ones must not cut it short
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block (main thread only), the handled signals raise `Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (*HANDLED, signal.SIGXFSZ)}
    for sig in HANDLED:
        signal.signal(sig, _raise_interrupted)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def exit_now(code: int) -> None:
    """End an interrupted process without waiting for worker threads.

    Prefect's and Dask's worker threads are not daemons: a normal exit would wait for the
    stage they are computing (minutes) and then publish it. Instead: run the atexit hooks
    (they stop Prefect's temporary server), delete the temporaries those threads are still
    writing, flush and leave.
    """
    from cfsp.io import remove_live_temporaries

    if threading.active_count() > 1:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        remove_live_temporaries()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_foreground(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a server command in its own process group and wait for it; when cfsp is
    interrupted, stop the whole group (a server's workers too), then re-raise."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        stop_group(proc)
        raise


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is gone; its workers may not be
        return
