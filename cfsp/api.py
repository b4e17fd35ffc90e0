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
from cfsp.data import calibration_windows
from cfsp.evaluate.api import count_params
from cfsp.export import save_checkpoint
from cfsp.io import atomic_dir, check_writable_parent
from cfsp.models import load_model

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


def compress(
    model_spec: str,
    calib: CalibConfig,
    prune: PruneConfig,
    out: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    batch_size: int = 8,
) -> dict:
    """Calibrate, capture, prune and reconstruct; write a checkpoint directory to `out`."""
    out = check_writable_parent(out)
    timings = {}
    t0 = time.perf_counter()
    loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    windows = calibration_windows(
        calib.source, loaded.tokenizer, calib.nsamples, calib.seqlen, calib.seed, loaded.model
    )
    timings["load_and_prepare"] = time.perf_counter() - t0
    params_before = count_params(loaded.model)
    t1 = time.perf_counter()
    stats = capture(loaded.model, windows, batch_size=batch_size)
    timings["capture"] = time.perf_counter() - t1
    report = prune_model(loaded.model, stats, prune)
    timings.update({f"prune_{k}": v for k, v in report.timings.items()})
    manifest = {
        "source_model": model_spec,
        "source_path": loaded.path,
        "revision": loaded.revision,
        "calibration": {"config": calib.model_dump(), "fingerprint": windows.fingerprint},
        "prune": report.to_dict(),
        "params_before": params_before,
        "params_after": count_params(loaded.model),
        "dtype": dtype,
        "versions": library_versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
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
