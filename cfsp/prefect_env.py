"""Prefect settings cfsp needs, applied before Prefect is imported (environment variables).

Without PREFECT_API_URL, Prefect starts its own temporary local server; on a slow machine it
needs more than the default 20 s to come up. Results persist as files (JSON records) so the
cache works across runs.
"""

from __future__ import annotations

import os


def configure_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
