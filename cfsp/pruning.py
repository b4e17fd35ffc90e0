"""High-level entry points: spec strings in, artifacts out. Used by the CLI and the tasks."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from cfsp import __version__
from cfsp.config import CalibConfig, PruneConfig
from cfsp.data import TokenWindows, check_source, windows_for
from cfsp.devices import resolve_device
from cfsp.engine.capture import capture
from cfsp.engine.driver import PruneReport, prune_model
from cfsp.engine.target import Target
from cfsp.errors import UsageError
from cfsp.export import (
    MANIFEST,
    MAX_SHARD_SIZE,
    check_exports,
    export_dirs,
    parse_exports,
    read_manifest,
    save_checkpoint,
)
from cfsp.faults import signal_point
from cfsp.io import atomic_dir, check_replaceable, check_writable_parent
from cfsp.models import LoadedModel, check_model_spec, count_params, load_model

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "cfsp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    model_spec: str, loaded, fingerprint: dict, report, params_before: int, timings: dict, **extra
) -> dict:
    """Everything a pruned checkpoint records about how it was made."""
    return {
        "source_model": model_spec,
        "source_path": loaded.path,
        "revision": loaded.revision,
        "calibration": {"fingerprint": fingerprint, **extra.pop("calibration", {})},
        "prune": report.to_dict(),
        "params_before": params_before,
        "params_after": count_params(loaded.model),
        "versions": library_versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **extra,
    }


def guard_output(out: Path, request: dict, overwrite: bool) -> None:
    """Refuse to replace an output that holds something else, unless told to; even when told
    to, replace only an empty folder or a cfsp output (never someone's data)."""
    if overwrite:
        check_replaceable(out)
        return
    if not out.exists():
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        if out.is_dir() and not any(out.iterdir()):
            return
        raise UsageError(
            f"{out} exists and is not a cfsp checkpoint; choose another --out or pass --overwrite"
        )
    previous = read_manifest(out).get("request")
    if previous != request:
        raise UsageError(
            f"{out} already holds a different run ({_describe(previous)}); "
            "choose another --out or pass --overwrite"
        )


def _describe(request: dict | None) -> str:
    if not isinstance(request, dict) or not request:
        return "unknown request"
    prune = request.get("prune") if isinstance(request.get("prune"), dict) else {}
    return f"{request.get('model')} {prune.get('method')} budget {prune.get('budget')}"


def prune_loaded(
    loaded: LoadedModel,
    windows: TokenWindows,
    cfg: PruneConfig,
    calib: CalibConfig,
    timings: dict,
    batch_size: int = 8,
    progress: bool = True,
    **extra,
) -> tuple[PruneReport, dict]:
    """Capture statistics on `windows` and prune `loaded.model` in place (the model resolved
    once for both); return the report and the manifest (`extra` keys appended to it)."""
    target = Target.of(loaded.model)
    params_before = count_params(loaded.model)
    t1 = time.perf_counter()
    stats = capture(target, windows, batch_size=batch_size, progress=progress)
    timings["capture"] = time.perf_counter() - t1
    report = prune_model(target, stats, cfg, windows=windows, batch_size=batch_size)
    timings.update({f"prune_{k}": v for k, v in report.timings.items()})
    manifest = build_manifest(
        loaded.spec,
        loaded,
        windows.fingerprint,
        report,
        params_before,
        timings,
        calibration={"config": calib.model_dump()},
        **extra,
    )
    return report, manifest


def run_request(model_spec: str, calib: CalibConfig, prune: PruneConfig, dtype: str) -> dict:
    """What a checkpoint was asked to be: recorded in its manifest, compared by `guard_output`."""
    return {
        "model": model_spec,
        "calibration": calib.model_dump(),
        "prune": prune.model_dump(),
        "dtype": dtype,
    }


def prune_to_checkpoint(
    model_spec: str,
    calib: CalibConfig,
    prune: PruneConfig,
    out: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    batch_size: int = 8,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    export: str | list[str] = "compact",
    device: str | None = "cpu",
) -> dict:
    """Calibrate, capture, prune and reconstruct on `device` (cfsp.devices: auto, cpu, cuda:N);
    write a checkpoint directory to `out`
    (weights in shards of at most `max_shard_size`, with an index, when larger).

    `export`: compact, padded, uniform or a list (cfsp.export); the first kind goes to `out`,
    each other one beside it (`OUT-padded`). The manifest's `exports` says where each is."""
    torch_device = resolve_device(device)
    out = check_writable_parent(out)
    kinds = parse_exports(export)
    dirs = export_dirs(out, kinds)
    for extra in list(dirs.values())[1:]:
        check_writable_parent(extra)
    check_model_spec(model_spec, trust_remote_code)
    check_source(calib.source, "calibration")
    request = run_request(model_spec, calib, prune, dtype)
    for folder in dirs.values():
        guard_output(folder, request, overwrite)
    timings = {}
    t0 = time.perf_counter()
    loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    loaded.model.to(torch_device)
    signal_point("load")  # tests only: an interrupt before anything is written
    check_exports(loaded.model.config, prune, kinds)
    windows = windows_for(calib, loaded.tokenizer, loaded.model)
    timings["load_and_prepare"] = time.perf_counter() - t0
    report, manifest = prune_loaded(
        loaded,
        windows,
        prune,
        calib,
        timings,
        batch_size,
        request=request,
        dtype=dtype,
        exports={kind: str(folder) for kind, folder in dirs.items()},
    )
    loaded.model.to("cpu")  # the checkpoint is written from host memory
    for kind, folder in dirs.items():
        with atomic_dir(folder) as tmp:
            save_checkpoint(loaded.model, loaded.tokenizer, tmp, manifest, kind, max_shard_size)
    log.info(
        "pruned %s: %.1f%% of block parameters removed (asked %.1f%%), %d -> %d params; wrote %s",
        model_spec,
        100 * report.achieved_fraction,
        100 * prune.budget,
        manifest["params_before"],
        manifest["params_after"],
        out,
    )
    return manifest
