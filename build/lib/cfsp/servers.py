"""Checks for the long-running commands (`cfsp dashboard`, `cfsp serve`), made before any
server starts: a bad port or schedule is a one-line usage error, not tracebacks from a child
process half a minute later."""

from __future__ import annotations

import errno
import socket

from cfsp.errors import CfspError, UsageError


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """`port` is a TCP port number and nothing listens on it on `host` yet."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port; use 1-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind it
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise CfspError(
                    f"port {port} on {host} is already in use; choose another --port"
                ) from err
            raise CfspError(f"cannot listen on {host}:{port}: {err.strerror}") from err


def check_cron(cron: str) -> None:
    """A cron string Prefect's own schedule model accepts (so `serve` cannot fail on it)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError as err:
        reason = err.errors()[0].get("msg", "invalid").removeprefix("Value error, ")
        raise UsageError(
            f"invalid --cron {cron!r}: {reason}; use five fields (minute hour day month "
            "weekday), e.g. '0 3 * * *'"
        ) from None
