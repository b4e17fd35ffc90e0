"""Fault injection for the kill-and-resume tests: the process SIGKILLs itself at a named point,
cleaning nothing up, as in a real crash.

    CFSP_FAULT_KILL_AFTER_BLOCK=N      after capturing block N (mid-stage)
    CFSP_FAULT_KILL_AFTER_STAGE=NAME   after stage NAME wrote its artifact, before its Prefect
                                       task returned (a stage boundary)
    CFSP_FAULT_SIGNAL_AT=POINT         send CFSP_FAULT_SIGNAL (TERM, INT, HUP, KILL; default
                                       TERM) to this process at POINT: `load` (before any
                                       write), `export` (checkpoint half-written), `publish`
                                       (between the two renames that replace an artifact)
"""

from __future__ import annotations

import os
import signal


def kill_point(variable: str, value: str | int) -> None:
    """SIGKILL this process when environment `variable` equals `value`."""
    target = os.environ.get(variable)
    if target is not None and target == str(value):
        os.kill(os.getpid(), signal.SIGKILL)


def signal_point(point: str) -> None:
    """Send this process the signal CFSP_FAULT_SIGNAL when CFSP_FAULT_SIGNAL_AT equals `point`:
    the interrupt tests hit exact moments instead of racing a timer."""
    if os.environ.get("CFSP_FAULT_SIGNAL_AT") == point:
        name = os.environ.get("CFSP_FAULT_SIGNAL", "TERM")
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
