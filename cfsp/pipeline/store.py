"""The one artifact store: every stage writes where dvc.yaml declares its output, whichever way
the run was started (`cfsp run` or `dvc repro` / `dvc exp run`), and keeps a JSON record of how
it was made inside that folder.

Layout (`<output>/dvc/`, the same templates dvc.yaml spells with `${...}`; tests/test_registry.py
checks they agree): per model `MODEL/prepare`, `MODEL/capture`, `MODEL/dense`; per run
`MODEL/METHOD-pBUDGET/{allocate,pruned,reconstructed,model,evaluate}`; and the small git-tracked
side outputs DVC compares across experiments, `metrics/...json` and `plots/...csv`.

The record (`cfsp_stage.json`) holds the stage's key (a digest of what its output depends on:
the content hashes of its inputs, or the model's content key; its declared parameter sections;
the run's pruning config where the stage reads it; the source of the code it runs), the content
hash of its output, a stamp of every file (size, mtime) and the stage's result. A stage whose
folder holds a record with the same key and matching content is not run again: the fast path
that replaces Prefect's result cache, and it works across entry points (`cfsp run` after
`dvc repro` reuses DVC's outputs and the other way round).
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.export import MANIFEST, STAGE_RECORD, verify_checkpoint
from cfsp.faults import kill_point
from cfsp.io import read_json, write_json
from cfsp.pipeline.keys import digest, model_key, slug
from cfsp.pipeline.registry import STAGES, StageContext, content_hash, run_stage

RECORD = STAGE_RECORD
RUN = "{model}/{method}-p{budget}"
FOLDERS = {
    "prepare": "{model}/prepare",
    "capture": "{model}/capture",
    "evaluate-dense": "{model}/dense",
    "allocate": f"{RUN}/allocate",
    "prune": f"{RUN}/pruned",
    "reconstruct": f"{RUN}/reconstructed",
    "recover": f"{RUN}/model",
    "evaluate": f"{RUN}/evaluate",
}
SIDE_OUTPUTS = {  # relative to the project (dvc.yaml's folder), git-tracked, `cache: false`
    "evaluate-dense": "metrics/{model}/dense.json",
    "allocate": "plots/{model}/{method}-p{budget}/keep.csv",
    "evaluate": "metrics/{model}/{method}-p{budget}.json",
}
READS_RUN_CONFIG = ("allocate", "prune", "reconstruct")  # the others: inputs and sections only
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def folder(stage: str, model: str, budget=None, method=None) -> str:
    """The stage's output folder under `<output>/dvc/`, as dvc.yaml's template renders it."""
    return FOLDERS[stage].format(model=model, budget=budget, method=method)


def plain_model(model: str) -> bool:
    """Whether a model spec is a plain name dvc.yaml can put in a path (an alias, `tiny`)."""
    return bool(_PLAIN.fullmatch(model))


def model_folder(model: str) -> str:
    """A spec as one path component: itself when plain, else a slug plus a digest of it (a
    path spec must not escape `<output>/dvc/`; DVC cannot declare such a model's stages)."""
    return model if plain_model(model) else f"{slug(model)}-{digest(model)[:8]}"


def stage_dir(output, stage: str, model: str, budget=None, method=None) -> Path:
    """Where `stage` of (model, budget, method) writes, for both entry points."""
    return Path(output) / "dvc" / folder(stage, model_folder(model), budget, method)


def side_output(stage: str, model: str, budget=None, method=None) -> str | None:
    template = SIDE_OUTPUTS.get(stage)
    return None if template is None else template.format(model=model, budget=budget, method=method)


@functools.cache
def code_digest(stage: str) -> str:
    """A digest of the library sources `stage` runs (its DVC code deps), read from the
    installed package, so that changed code invalidates a record as it invalidates dvc.lock."""
    root = Path(__file__).resolve().parents[2]
    parts = []
    for entry in STAGES[stage].code:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        parts += [(str(f.relative_to(root)), hashlib.sha256(f.read_bytes()).hexdigest())
                  for f in files if f.is_file()]  # fmt: skip
    return digest(parts)


def stage_key(stage: str, upstream: list[str], sections: dict, run: dict | None, reference=None):
    """What `stage`'s output depends on: the content hashes of its inputs (the model's content
    key for a first stage), its sections, the run config where it reads one, its code."""
    run = run if stage in READS_RUN_CONFIG else None
    return digest(stage, upstream, sections, run, reference, code_digest(stage))


def _stamp(out: Path) -> dict:
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != RECORD
    }


def write_record(out: Path, stage: str, key: str, stage_s: float, info: dict) -> dict:
    """Record how `out` was made (inside it, replaced atomically: a hard link is never
    written through); returns the record with its path."""
    record = {"stage": stage, "key": key, "hash": content_hash(stage, out), "stage_s": stage_s}
    record.update(stamp=_stamp(out), info=info)
    write_json(out / RECORD, record)
    return {"path": str(out), **record}


def load_record(out: Path) -> dict | None:
    """The record in `out` with its path, or None when there is none (or it is unreadable)."""
    try:
        record = read_json(Path(out) / RECORD, expect=dict)
    except Exception:  # noqa: BLE001 - no record, a half-written one: not made by a stage
        return None
    return {"path": str(out), **record} if {"key", "hash", "info"} <= set(record) else None


def fresh_record(out: Path, stage: str, key: str) -> dict | None:
    """The record in `out` if it was made from `key` and the folder still holds what it
    recorded (same file stamps, or, when they moved, the same content: the first artifact's
    sha256, every file of a checkpoint against its manifest); None means run the stage."""
    out = Path(out)
    record = load_record(out) if out.is_dir() else None
    if record is None or record["key"] != key:
        return None
    try:
        if record.get("stamp") == _stamp(out):
            return record
        if content_hash(stage, out) != record["hash"]:
            return None
        if STAGES[stage].artifact == MANIFEST and verify_checkpoint(out):
            return None
    except (OSError, ValueError, KeyError, CfspError):
        return None
    return record


def _input_hash(stage: str, path: Path | None) -> str:
    """An input's content hash; a missing or unreadable one keys nothing that exists (the
    stage itself then says what is wrong with it)."""
    try:
        return content_hash(stage, Path(path))
    except (OSError, ValueError, KeyError, TypeError, CfspError):
        return f"unreadable:{path}"


def run_recorded(name: str, ctx: StageContext) -> dict:
    """Run a registered stage into `ctx.out` unless the folder holds a fresh record of the
    same key; returns the record ({path, key, hash, stage_s, info, ...}, `cached` when reused).
    The one way `cfsp stage` (what dvc.yaml runs) and the Prefect tasks run a stage."""
    stage = STAGES[name]
    upstream = [_input_hash(i, ctx.inputs.get(i)) for i in stage.inputs] or [model_key(ctx.model)]
    key = stage_key(name, upstream, ctx.sections, ctx.prune, ctx.reference)
    fresh = fresh_record(ctx.out, name, key)
    if fresh is not None:
        return {**fresh, "cached": True}
    start = time.perf_counter()
    info = run_stage(name, ctx)
    seconds = round(time.perf_counter() - start, 3)
    kill_point("CFSP_FAULT_KILL_AFTER_STAGE", name)  # tests only: written, not yet recorded
    return write_record(Path(ctx.out), name, key, seconds, info)


def write_side_output(stage: str, path: Path, info: dict) -> Path:
    """The small file DVC compares across experiments: an allocation's per-block keep ratios
    (CSV, for `dvc plots`) or an evaluation's flat metrics (JSON, for `dvc metrics`)."""
    from cfsp.io import atomic_file
    from cfsp.metrics import flatten

    if stage == "allocate":
        rows = "".join(f"{i},{k:.6f}\n" for i, k in enumerate(info["keep_ratios"]))
        with atomic_file(path) as tmp:
            tmp.write_text("block,keep_ratio\n" + rows)
        return Path(path)
    return write_json(path, flatten(info))
