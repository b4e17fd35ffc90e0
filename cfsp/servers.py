"""Checks for the server commands (`cfsp dashboard`, `cfsp serve`, `cfsp deploy`), made before any
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


def check_schedule(cron: str, timezone: str = "UTC") -> None:
    """A cron string and IANA time zone Prefect's own schedule model accepts (so `serve` and
    `deploy` cannot fail on them after a server is contacted)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as err:
        first = err.errors()[0]
        reason = first.get("msg", "invalid").removeprefix("Value error, ")
        if first.get("loc") == ("timezone",):
            raise UsageError(
                f"invalid --timezone {timezone!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        raise UsageError(
            f"invalid --cron {cron!r}: {reason}; use five fields (minute hour day month "
            "weekday), e.g. '0 3 * * *'"
        ) from None


def check_concurrency(limit: int) -> None:
    """At least one run of the deployment at a time."""
    if limit < 1:
        raise UsageError(f"--concurrency {limit}: at least 1 run at a time")


def require_prefect_server() -> str:
    """PREFECT_API_URL names a Prefect server that answers. A deployment must outlive this
    command, so Prefect's temporary server (what it starts when the variable is unset) is
    refused rather than used silently."""
    import os

    import httpx

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        raise UsageError(
            "PREFECT_API_URL is not set: a deployment needs a Prefect server that outlives "
            "this command; run `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise CfspError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({type(err).__name__}); "
            "start one with `prefect server start`"
        ) from None
    return url
