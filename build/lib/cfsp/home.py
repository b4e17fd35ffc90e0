"""Where cfsp keeps its caches: `CFSP_HOME` (default ~/.cache/cfsp)."""

from __future__ import annotations

import os
from pathlib import Path

from cfsp.errors import UsageError


def cfsp_home() -> Path:
    return Path(os.environ.get("CFSP_HOME", "~/.cache/cfsp")).expanduser()


def cache_dir(*parts: str) -> Path:
    """`CFSP_HOME/parts...` with its parent folder created; a CFSP_HOME that is a file, or a
    folder cfsp may not write, is one clear error instead of an OSError from deep inside."""
    path = cfsp_home().joinpath(*parts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UsageError(
            f"CFSP_HOME={cfsp_home()} cannot hold cfsp's cache ({path.parent}: "
            f"{err.strerror or err}); point CFSP_HOME at a writable folder"
        ) from err
    return path
