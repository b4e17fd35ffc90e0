"""`cfsp prune`'s default engine: the block-streamed engine (cfsp.engine.streamed) behind the
same request, checks and checkpoint conventions as cfsp.pruning.prune_to_checkpoint (the
in-memory engine, `--in-memory`), for models given as safetensors folders. `engine_for` picks
the engine: streamed wherever it can run, in memory otherwise (the reason is logged).

Only a directory of safetensors weights can be streamed (an embedded alias resolves to one);
a GGUF file or a hub id is refused with one line. Only the compact export is written (padded
and uniform exports need the whole pruned model: write them afterwards from the checkpoint
with cfsp.export.write_exports). The manifest is cfsp.pruning.build_manifest's, plus a `stream`
section: device, pass timings, and per block time, peak host RSS and peak device memory; the
files are finished as save_checkpoint finishes them (terms, model card, 0644 modes, sha256).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

from cfsp.config import CalibConfig, PruneConfig
from cfsp.errors import UsageError
from cfsp.export import MAX_SHARD_SIZE
from cfsp.faults import signal_point

log = logging.getLogger(__name__)


def stream_source(spec: str, trust_remote_code: bool = False):
    """(directory, revision, config) of a model spec that names safetensors on disk."""
    from cfsp.arch import adapter_for
    from cfsp.embedded import EMBEDDED, embedded_checkpoint
    from cfsp.models import ALIASES, _read_config, _resolve_spec, check_checkpoint_dir

    kind, path = _resolve_spec(spec)
    if kind == "alias":
        embedded = EMBEDDED[ALIASES[spec]]
        path, revision = Path(embedded_checkpoint(embedded.name)), embedded.revision
    elif kind == "dir":
        revision = "local"
    else:
        raise UsageError(
            f"--stream reads a directory of safetensors weights (or an embedded alias); "
            f"{spec} is a {'GGUF file' if kind == 'gguf' else 'hub id'}: convert or download it "
            "to a directory first, or prune without --stream"
        )
    check_checkpoint_dir(path)
    config = _read_config(path, trust_remote_code)
    adapter_for(config)  # an unsupported architecture fails here, from config.json alone
    if getattr(config, "cfsp_layer_widths", None):
        raise UsageError(f"{spec} is already pruned to per-block widths; prune the dense model")
    return path, revision, config


def engine_for(
    model_spec: str,
    export: str | list[str],
    stream: bool | None,
    trust: bool,
    dtype: str = "float32",
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> bool:
    """True to prune block-streamed, False in memory: `stream` when given (--stream /
    --in-memory), else streamed whenever it can be (a safetensors directory or an alias, the
    compact export, no remote code, every block within `max_shard_size`); the reason for
    falling back is logged."""
    from cfsp.export import parse_exports
    from cfsp.models import _resolve_spec

    if stream is not None:
        return stream
    kind, _ = _resolve_spec(model_spec)
    reason = None
    if kind not in ("dir", "alias"):
        reason = f"{model_spec} is a {'GGUF file' if kind == 'gguf' else 'hub id'}"
    elif parse_exports(export) != ["compact"]:
        reason = "the padded and uniform exports need the whole pruned model"
    elif trust:
        reason = "a model with remote code is built by its own code (not as a skeleton)"
    elif not _shards_fit(model_spec, dtype, max_shard_size):
        reason = "a block or embedding is larger than --max-shard-size (one shard each)"
    if reason is not None:
        log.info("pruning in memory: %s", reason)
    return reason is None


def _shards_fit(model_spec: str, dtype: str, max_shard_size: str | int) -> bool:
    """Whether every block and outside module fits one shard (headers and config only)."""
    import torch

    from cfsp.engine.streamed import open_stream
    from cfsp.engine.streamed_layout import check_shard_limit, outside_groups
    from cfsp.io import parse_shard_size
    from cfsp.models import parse_dtype

    path, _, config = stream_source(model_spec)
    stream = open_stream(path, config, parse_dtype(dtype), torch.device("cpu"), 1)
    try:
        check_shard_limit(stream, outside_groups(stream), parse_shard_size(max_shard_size))
    except UsageError:
        return False
    return True


def check_stream_export(export: str | list[str]) -> None:
    """--stream writes the compact export only; refuse any other before any work."""
    from cfsp.export import parse_exports

    kinds = parse_exports(export)
    if kinds != ["compact"]:
        raise UsageError(
            f"--stream writes the compact export only, not {','.join(kinds)}; prune without "
            "--stream, or write the other kinds from the streamed checkpoint afterwards"
        )


def prune_streamed_to_checkpoint(
    model_spec: str,
    calib: CalibConfig,
    prune: PruneConfig,
    out: str | Path,
    dtype: str = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 8,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    export: str | list[str] = "compact",
    text=None,
) -> dict:
    """prune_to_checkpoint, block-streamed: same request, same checkpoint, bounded memory.
    One shard per block and per module outside the blocks (each under `max_shard_size`),
    merged into one model.safetensors at the end when they fit `max_shard_size` together.
    `text`: calibration text held in memory (cfsp.data.Text), instead of `calib.source`."""
    from transformers import AutoTokenizer

    from cfsp.arch import adapter_for
    from cfsp.data import check_source, windows_for
    from cfsp.engine.streamed import prune_streamed
    from cfsp.engine.streamed_weights import consolidate, empty_model, resolve_device
    from cfsp.io import atomic_dir, check_writable_parent, parse_shard_size
    from cfsp.models import check_tokenizer_matches, count_params, parse_dtype
    from cfsp.pruning import build_manifest, guard_output, run_request

    out = check_writable_parent(out)
    check_stream_export(export)
    shard_limit = parse_shard_size(max_shard_size)
    torch_dtype, torch_device = parse_dtype(dtype), resolve_device(device)
    path, revision, config = stream_source(model_spec, trust_remote_code)
    adapter_for(config)
    if text is None:
        check_source(calib.source, "calibration")
    request = run_request(model_spec, calib, prune, dtype)
    guard_output(out, request, overwrite)
    t0 = time.perf_counter()
    skeleton = empty_model(config, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer_matches(skeleton, tokenizer, model_spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    windows = windows_for(calib, tokenizer, skeleton, text)
    timings = {"load_and_prepare": time.perf_counter() - t0}
    signal_point("load")  # tests only: an interrupt before anything is written
    with atomic_dir(out) as tmp:
        outcome = prune_streamed(
            path, windows, prune, tmp, torch_dtype, torch_device, batch_size, config, shard_limit
        )
        outcome.stream["consolidated"] = consolidate(tmp, shard_limit)  # fits one file
        signal_point("export")  # tests only: a signal while the checkpoint is half-written
        timings.update({f"stream_{k}": v for k, v in outcome.report.timings.items()})
        loaded = SimpleNamespace(path=str(path), revision=revision, model=outcome.shadow)
        manifest = build_manifest(
            model_spec,
            loaded,
            windows.fingerprint,
            outcome.report,
            count_params(skeleton),
            timings,
            calibration={"config": calib.model_dump()},
            request=request,
            dtype=dtype,
            exports={"compact": str(out)},
            stream=outcome.stream,
        )
        write_rest(path, tokenizer, tmp, manifest, outcome.custom_code)
    log.info(
        "pruned %s (streamed on %s): %.1f%% of block parameters removed, peak rss %.0f MiB; "
        "wrote %s",
        model_spec,
        torch_device,
        100 * outcome.report.achieved_fraction,
        outcome.stream["peak_rss_mib"],
        out,
    )
    return manifest


def write_rest(source: Path, tokenizer, out: Path, manifest: dict, custom: bool) -> None:
    """Generation config and tokenizer, then what cfsp.export.save_checkpoint writes after the
    weights: the source's terms, the model card, 0644 modes, the manifest with every sha256."""
    from transformers import GenerationConfig

    from cfsp.export import finish_checkpoint

    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    tokenizer.save_pretrained(out)
    finish_checkpoint(out, manifest, "compact", custom)
