"""Fault injection for the kill-and-resume tests: the process SIGKILLs itself at a named point,
cleaning nothing up, as in a real crash.

    CFSP_FAULT_KILL_AFTER_BLOCK=N      after capturing block N (mid-stage)
    CFSP_FAULT_KILL_AFTER_STAGE=NAME   after stage NAME wrote its artifact, before its Prefect
                                       task returned (a stage boundary)
"""

from __future__ import annotations

import os
import signal


def kill_point(variable: str, value: str | int) -> None:
    """SIGKILL this process when environment `variable` equals `value`."""
    target = os.environ.get(variable)
    if target is not None and target == str(value):
        os.kill(os.getpid(), signal.SIGKILL)
