"""DVC lineage for every run, whichever way it was started.

`dvc repro` / `dvc exp run` write dvc.lock themselves. A `cfsp run` writes the same folders
(cfsp.pipeline.store) and then records them the same way: `dvc commit` of the stages it ran, so
dvc.lock holds their deps, params and output hashes and `.dvc/cache` holds the outputs. That is
only honest when dvc.lock would describe this run, so `plan` checks first:

* the working directory is a DVC project (dvc.yaml and .dvc/), with dvc importable;
* the run's parameters are params.yaml's (dvc.lock records params.yaml's values: a `-S` override
  or another `--params` file would be recorded as something it was not); such a run is not
  committed, and says so: `dvc exp run -S ...` records an experiment instead;
* every model is a plain name that dvc.yaml can put in a path.

Otherwise the run still writes the same folders, and its MLflow tags say `dvc.lineage: none`
with the reason. The MLflow tags of a run point at its entries in dvc.lock (`run_tags`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cfsp.config import Params, load_params
from cfsp.errors import CfspError
from cfsp.pipeline.registry import TRACK as TRACK
from cfsp.pipeline.store import plain_model, stage_dir
from cfsp.tracking import file_sha256

log = logging.getLogger("cfsp.lineage")
LOCK = "dvc.lock"


@dataclass(frozen=True)
class Lineage:
    """Where a run's lineage goes: `root` (a DVC project) or None, with the reason."""

    root: Path | None
    reason: str = ""


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def plan(params: Params, grid: list | None = None, root: Path | None = None) -> Lineage:
    """Whether the lineage of this run (`grid`: its (model, budget, method)s, default the
    whole sweep) can be recorded in the DVC project at `root` (default: the working
    directory), and if not, why (one sentence)."""
    root = Path.cwd() if root is None else Path(root)
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return Lineage(None, f"{root} is not a DVC project (no dvc.yaml and .dvc/)")
    try:
        import dvc  # noqa: F401
    except ImportError:
        return Lineage(None, "dvc is not installed")
    if not (root / "params.yaml").is_file():
        return Lineage(None, f"{root} has no params.yaml for dvc.yaml to read")
    try:
        declared = _flat(load_params(root / "params.yaml").model_dump())
    except CfspError as err:
        return Lineage(None, f"params.yaml does not load ({err})")
    effective = _flat(params.model_dump())
    changed = sorted(k for k in declared.keys() | effective.keys()
                     if declared.get(k) != effective.get(k))  # fmt: skip
    if changed:
        keys = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        return Lineage(
            None,
            f"this run's parameters differ from params.yaml ({keys}) and dvc.lock records "
            "params.yaml's; run `dvc exp run -S KEY=VALUE` to record an experiment",
        )
    odd = [m for m in params.models if not plain_model(m)]
    if odd:
        return Lineage(None, f"model {odd[0]!r} is not a plain name dvc.yaml can declare")
    sweep = {(m, b, meth) for m in params.models for b in params.budgets for meth in params.methods}
    outside = [run for run in grid or [] if tuple(run) not in sweep]
    if outside:
        return Lineage(None, f"{outside[0]} is not in params.yaml's sweep, so not in dvc.yaml")
    return Lineage(root)


def dvc_name(stage: str, model: str, budget=None, method=None) -> str:
    """dvc.yaml's name of one matrix entry: `prepare@tiny`, `allocate@tiny-0.4-cfsp`."""
    item = [model] if budget is None else [model, str(budget), method]
    return f"{stage}@{'-'.join(item)}"


def commit(lineage: Lineage, targets: list[str]) -> Lineage:
    """`dvc commit --force` of `targets` in the project: dvc.lock records their deps, params
    and outputs as they are now and `.dvc/cache` takes the outputs. A failed commit is a
    warning, not a failed run (the artifacts are all there): the lineage returned then says
    `none` and why."""
    if lineage.root is None or not targets:
        return lineage
    cmd = [sys.executable, "-m", "dvc", "commit", "--force", *targets]  # --quiet hides errors
    try:
        proc = subprocess.run(cmd, cwd=lineage.root, capture_output=True, text=True, timeout=1800)
        failed = proc.returncode != 0
        lines = (proc.stderr + proc.stdout).splitlines()
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        detail = " ".join(" ".join(errors).split())[:300]
    except (OSError, subprocess.SubprocessError) as err:
        failed, detail = True, str(err)
    if not failed:
        return lineage
    unrecorded = Lineage(None, f"dvc commit failed: {detail or 'no message'}")
    warn_unrecorded(unrecorded)
    return unrecorded


def read_lock(root: Path) -> dict:
    """dvc.lock's stages ({} when there is none)."""
    path = Path(root) / LOCK
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages") or {}


def _out_md5(lock: dict, name: str, path: Path) -> str:
    """The md5 dvc.lock records for output `path` of stage `name`, or "none"."""
    for out in (lock.get(name) or {}).get("outs") or []:
        if Path(out.get("path", "")) == path:
            return str(out.get("md5", "none"))
    return "none"


def run_tags(lineage: Lineage, output: str, model: str, budget, method, healed: bool) -> dict:
    """A run's lineage tags: the dvc.lock entries of its checkpoint and evaluation (their
    output md5s, as `dvc status` compares them), or `dvc.lineage: none (reason)`."""
    ckpt_stage = "recover" if healed else "reconstruct"
    tags = {"dvc.lineage": "dvc.lock" if lineage.root else f"none ({lineage.reason})"[:500]}
    tags["dvc.lock.sha256"] = file_sha256(str(lineage.root / LOCK)) if lineage.root else "none"
    lock = read_lock(lineage.root) if lineage.root else {}
    for key, stage in (("checkpoint", ckpt_stage), ("evaluate", "evaluate")):
        name = dvc_name(stage, model, budget, method)
        path = stage_dir(output, stage, model, budget, method)
        tags[f"dvc.{key}.stage"] = name if lineage.root else "none"
        tags[f"dvc.{key}.md5"] = _out_md5(lock, name, path)
    return tags


def sweep_tags(lineage: Lineage) -> dict:
    """The parent run's lineage tags (its children carry the per-stage ones)."""
    tags = {"dvc.lineage": "dvc.lock" if lineage.root else f"none ({lineage.reason})"[:500]}
    tags["dvc.lock.sha256"] = file_sha256(str(lineage.root / LOCK)) if lineage.root else "none"
    return tags


def grid_targets(grid: list) -> list[str]:
    """dvc.yaml's names of every stage of the runs in `grid` ((model, budget, method)s)."""
    from cfsp.pipeline.registry import STAGES

    names = []
    for model, budget, method in grid:
        for name, stage in STAGES.items():
            where = (budget, method) if stage.per_method else ()
            names.append(dvc_name(name, model, *where))
    return list(dict.fromkeys(names))


def warn_unrecorded(lineage: Lineage) -> None:
    if lineage.root is None:
        log.warning("lineage not recorded in dvc.lock: %s", lineage.reason)
