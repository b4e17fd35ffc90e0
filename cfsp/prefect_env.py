"""Prefect settings cfsp needs, applied before Prefect is imported (environment variables).

Without PREFECT_API_URL, Prefect starts its own temporary local server (for `cfsp run`; `cfsp
deploy` and `cfsp serve` refuse it); on a slow machine it needs more than the default 20 s to
come up. Results persist as files (JSON records, JSON also by default: never pickle) so the cache
works across runs. cfsp's log lines go to the run's logs in Prefect (logger `cfsp` is one of
Prefect's extra loggers; outside a run they stay local, without a warning per line).

The environment Prefect reads is checked first: a PREFECT_HOME that is a file, or a
PREFECT_API_URL that is not an http(s) URL, otherwise costs minutes of server retries and
thousands of log lines before a misleading time-out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cfsp.errors import UsageError


def check_prefect_home() -> Path:
    """PREFECT_HOME (default ~/.prefect) is a writable directory, or can be made one."""
    raw = os.environ.get("PREFECT_HOME") or "~/.prefect"
    home = Path(raw).expanduser()
    if home.exists() and not home.is_dir():
        raise UsageError(
            f"PREFECT_HOME={raw} is not a directory; Prefect keeps its database and results "
            "there: point PREFECT_HOME at a folder (or unset it for ~/.prefect)"
        )
    try:
        home.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".cfsp-probe-", dir=home))
    except OSError as err:
        raise UsageError(
            f"PREFECT_HOME={raw} cannot be used ({err.strerror}); point it at a writable folder"
        ) from err
    return home


def check_prefect_api_url() -> None:
    """PREFECT_API_URL, when set, is an http(s) URL with a host and a valid port."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as err:
        raise UsageError(f"PREFECT_API_URL={url} is not a valid URL ({err})") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"PREFECT_API_URL={url} is not an http(s) URL of a Prefect server "
            "(e.g. http://127.0.0.1:4200/api); unset it to use a temporary local server"
        )


def configure_prefect() -> None:
    check_prefect_home()
    check_prefect_api_url()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cfsp")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
