"""Where cfsp keeps its caches: `CFSP_HOME` (default ~/.cache/cfsp)."""

from __future__ import annotations

import os
from pathlib import Path


def cfsp_home() -> Path:
    return Path(os.environ.get("CFSP_HOME", "~/.cache/cfsp")).expanduser()


def cache_dir(*parts: str) -> Path:
    path = cfsp_home().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
