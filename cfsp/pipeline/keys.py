"""Content keys for cache paths: the same inputs always map to the same artifact directory."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from cfsp.embedded import EMBEDDED
from cfsp.models import ALIASES


def digest(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def model_key(spec: str) -> str:
    """Identify a model's content cheaply: pinned wheel, or file names/sizes/mtimes."""
    if spec in ALIASES:
        return f"{ALIASES[spec]}@{EMBEDDED[ALIASES[spec]].revision}"
    path = Path(spec).expanduser()
    if path.exists():
        files = sorted(path.glob("*")) if path.is_dir() else [path]
        stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
        return f"{path.resolve()}#{digest(stamp)}"
    return spec  # a hub id: transformers resolves the revision


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def run_name(model: str, method: str, budget: float) -> str:
    """`smollm2-135m-p0.3-cfsp`: model, budget, method (the MLflow run name and the folder of
    its report; MLflow shows long names cut at the end, so the method comes last)."""
    return f"{slug(Path(model).name or model)}-p{budget:g}-{slug(method)}"


def sweep_name(models: list[str]) -> str:
    """`sweep-smollm2-135m` (models joined by `+`): the sweep's MLflow parent run and its
    Prefect flow run."""
    return "sweep-" + "+".join(slug(Path(m).name or m) for m in dict.fromkeys(models))
