"""High-level entry points: spec strings in, artifacts out. Used by the CLI and the tasks."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from cfsp import __version__
from cfsp.capture import capture
from cfsp.compress import prune_model
from cfsp.config import CalibConfig, PruneConfig
from cfsp.data import calibration_windows, check_source
from cfsp.errors import UsageError
from cfsp.evaluate.api import count_params
from cfsp.export import MANIFEST, read_manifest, save_checkpoint
from cfsp.faults import signal_point
from cfsp.io import atomic_dir, check_replaceable, check_writable_parent
from cfsp.models import check_model_spec, load_model

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


def compress(
    model_spec: str,
    calib: CalibConfig,
    prune: PruneConfig,
    out: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    batch_size: int = 8,
    overwrite: bool = False,
) -> dict:
    """Calibrate, capture, prune and reconstruct; write a checkpoint directory to `out`."""
    out = check_writable_parent(out)
    check_model_spec(model_spec, trust_remote_code)
    check_source(calib.source, "calibration")
    request = {
        "model": model_spec,
        "calibration": calib.model_dump(),
        "prune": prune.model_dump(),
        "dtype": dtype,
    }
    guard_output(out, request, overwrite)
    timings = {}
    t0 = time.perf_counter()
    loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    signal_point("load")  # tests only: an interrupt before anything is written
    windows = calibration_windows(
        calib.source, loaded.tokenizer, calib.nsamples, calib.seqlen, calib.seed, loaded.model
    )
    timings["load_and_prepare"] = time.perf_counter() - t0
    params_before = count_params(loaded.model)
    t1 = time.perf_counter()
    stats = capture(loaded.model, windows, batch_size=batch_size)
    timings["capture"] = time.perf_counter() - t1
    report = prune_model(loaded.model, stats, prune, windows=windows, batch_size=batch_size)
    timings.update({f"prune_{k}": v for k, v in report.timings.items()})
    manifest = build_manifest(
        model_spec,
        loaded,
        windows.fingerprint,
        report,
        params_before,
        timings,
        calibration={"config": calib.model_dump()},
        request=request,
        dtype=dtype,
    )
    with atomic_dir(out) as tmp:
        save_checkpoint(loaded.model, loaded.tokenizer, tmp, manifest)
    log.info(
        "pruned %s: %.1f%% of block parameters removed (asked %.1f%%), %d -> %d params; wrote %s",
        model_spec,
        100 * report.achieved_fraction,
        100 * prune.budget,
        params_before,
        manifest["params_after"],
        out,
    )
    return manifest
