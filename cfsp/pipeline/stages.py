"""The pipeline's stages as pure functions: specs and artifact paths in, artifacts out.

    prepare      model + text source        -> tokens.safetensors (+ fingerprint)
    capture      model + tokens             -> moments.safetensors (O(width) per block) and
                                               grams/block-NNNNN.safetensors (one per block)
    allocate     model + moments + config   -> allocation.json + allocation.png
    prune        model + allocation         -> pruned checkpoint (no compensation)
    reconstruct  model + allocation + stats -> reconstructed checkpoint
    recover      checkpoint + stats + text  -> LoRA-healed checkpoint, merged (optional)
    evaluate     checkpoint + eval config   -> metrics.json

The model stages follow the block-streamed engine's passes (cfsp.engine.streamed): capture
is its pass 1 (one dense forward, each block's weights loaded in turn, its Gram matrices
written to their own file as soon as the block is done), allocate reads the O(width) moments
and each block's weights in turn (no forward), prune / reconstruct are its pass 2 (each block
read, folded from its own statistics file, written). No stage holds more than one block's
weights or width^2 statistics.

The stage registry (cfsp.pipeline.registry) declares each one's inputs, artifacts and
parameters; the CLI (`cfsp stage ...`), the Prefect tasks and the DVC stages all call these
through it. Every output
is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cfsp.config import CalibConfig, EvalConfig, PruneConfig, RecoverConfig
from cfsp.data import TokenWindows, calibration_windows, check_source, tensor_hash, windows_for
from cfsp.devices import resolve_device
from cfsp.engine.plan import PrunePlan
from cfsp.engine.streamed_spill import MOMENTS, check_grams, read_moments, write_moments
from cfsp.errors import CfspError, UsageError
from cfsp.evaluation.from_spec import evaluate_model
from cfsp.export import read_manifest, save_checkpoint
from cfsp.io import atomic_dir, check_output_dir, read_json, write_json
from cfsp.models import check_safetensors, count_params, load_model
from cfsp.plots import allocation_plot, loss_plot
from cfsp.pruning import build_manifest

log = logging.getLogger(__name__)

TOKENS = "tokens.safetensors"
STATS = MOMENTS  # the capture's first artifact; its hash covers every block file's
ALLOCATION = "allocation.json"
METRICS = "metrics.json"


def _load_tokens(path: Path) -> TokenWindows:
    path = Path(path)
    path = path / TOKENS if path.is_dir() else path
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"calibration tokens {path} do not exist; run the prepare stage first")
    check_safetensors(path)  # a truncated file: one clear error, not the reader's traceback
    try:
        with safe_open(str(path), "pt") as handle:
            ids = handle.get_tensor("ids")
            names = set(handle.keys())  # the reader has no __contains__
            held = handle.get_tensor("heldout") if "heldout" in names else None
            fingerprint = json.loads((handle.metadata() or {})["fingerprint"])
        if not isinstance(fingerprint, dict) or any(
            t is not None and (t.dim() != 2 or t.is_floating_point()) for t in (ids, held)
        ):
            raise ValueError("expected integer ids [windows, seqlen] and a fingerprint object")
        recorded = fingerprint["hash"]
        held_recorded = fingerprint["heldout_hash"] if held is not None else None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, SafetensorError) as err:
        raise CfspError(f"{path} is not a calibration tokens file ({_what(err)})") from err
    if tensor_hash(ids) != recorded or (held is not None and tensor_hash(held) != held_recorded):
        raise CfspError(f"{path}: token ids do not match their recorded hash (corrupt file)")
    return TokenWindows(ids, fingerprint, held)


def _what(err: BaseException) -> str:
    """A one-line description of a parsing error (a KeyError prints only the key)."""
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r} entry"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def prepare(model_spec: str, calib: CalibConfig, out: Path, dtype: str = "float32") -> dict:
    """Tokenize the calibration source into N x L windows; returns the fingerprint."""
    check_output_dir(out)
    check_source(calib.source, "calibration")
    loaded = load_model(model_spec, dtype=dtype)
    windows = windows_for(calib, loaded.tokenizer, loaded.model)
    fingerprint = {**windows.fingerprint, "model": model_spec, "revision": loaded.revision}
    tensors = {"ids": windows.ids.contiguous()}
    if windows.heldout is not None:
        tensors["heldout"] = windows.heldout.contiguous()
    with atomic_dir(out) as tmp:
        save_file(
            tensors,
            str(tmp / TOKENS),
            metadata={"fingerprint": json.dumps(fingerprint)},
        )
        write_json(tmp / "prepare.json", {"config": calib.model_dump(), "fingerprint": fingerprint})
    return fingerprint


def _source(model_spec: str):
    """(directory, revision, config) of a model the streamed stages can read block by block."""
    from cfsp.pruning_streamed import stream_source

    return stream_source(model_spec)


def _open(model_spec: str, dtype: str, batch_size: int = 8, device: str = "cpu"):
    from cfsp.engine.streamed import open_stream
    from cfsp.models import parse_dtype

    path, revision, config = _source(model_spec)
    stream = open_stream(path, config, parse_dtype(dtype), resolve_device(device), batch_size)
    return stream, path, revision


def capture_stage(
    model_spec: str,
    tokens: Path,
    out: Path,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """The streamed engine's pass 1 over the calibration tokens: per-block statistics, the
    O(width) part in one file, each block's Gram matrices in a file of its own."""
    from cfsp.engine.streamed import pass_one

    check_output_dir(out)
    windows = _load_tokens(tokens)
    stream, _, _ = _open(model_spec, dtype, batch_size, device)
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        blocks, digests, _ = pass_one(stream, windows.ids, tmp)
        wall = round(time.perf_counter() - start, 3)
        write_moments(tmp, blocks, windows.fingerprint, wall, digests)
        write_json(
            tmp / "capture.json",
            {
                "fingerprint": windows.fingerprint,
                "wall_s": wall,
                "angular": [b.angular for b in blocks],
                "batch_size": batch_size,
                "device": str(resolve_device(device)),
                "blocks": stream.rows,
            },
        )
    return {"wall_s": wall, "blocks": len(blocks)}


def _load_moments(path: Path) -> tuple[Path, list, dict]:
    """(capture folder, per-block O(width) statistics, metadata) of a capture folder or its
    moments file."""
    path = Path(path)
    path = path / MOMENTS if path.is_dir() else path
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"statistics {path} do not exist; run the capture stage first")
    check_safetensors(path)
    blocks, meta = read_moments(path)
    return path.parent, blocks, meta


def allocate_stage(
    model_spec: str,
    stats_path: Path,
    cfg: PruneConfig,
    out: Path,
    dtype: str = "float32",
    device: str = "cpu",
    tokens: Path | None = None,
) -> dict:
    """Per-block keep ratios and kept indices, with a plot against the angular distances:
    fine scores from the captured moments and each block's weights, loaded in turn; with
    `control: auto` and held-out windows in `tokens`, the control they choose (streamed
    engine's choice, from the capture's Gram files)."""
    import torch

    from cfsp.engine.choose import chooses
    from cfsp.engine.driver import plan_from_scores
    from cfsp.engine.streamed import Spill, choose_streamed, score_blocks

    check_output_dir(out)
    folder, blocks, meta = _load_moments(stats_path)
    heldout = _load_tokens(tokens).heldout if tokens is not None else None
    stream, _, _ = _open(model_spec, dtype, device=device)
    start = time.perf_counter()
    scores = score_blocks(stream, blocks, cfg)
    angular = [b.angular for b in blocks]
    angular_t = torch.tensor(angular, dtype=torch.float64)
    choice = {}
    if chooses(cfg, heldout):
        spill = Spill(folder, check_grams(folder, meta, len(blocks)))
        alloc, choice = choose_streamed(stream, angular_t, scores, cfg, heldout, spill)
    else:
        alloc = plan_from_scores(stream.target.geometry, angular_t, scores, cfg)
    payload = {
        "config": cfg.model_dump(),
        "calibration": meta.get("fingerprint", {}),
        "angular": angular,
        **({"control_choice": choice} if choice else {}),
        **alloc.to_dict(),
        "widths": [b.widths().to_dict() for b in alloc.blocks],
        "wall_s": round(time.perf_counter() - start, 3),
    }
    with atomic_dir(out) as tmp:
        write_json(tmp / ALLOCATION, payload)
        allocation_plot(
            alloc.keep_ratios,
            payload["angular"],
            cfg.budget,
            f"{model_spec}: {cfg.method} allocation={cfg.allocation} p={cfg.budget}",
            tmp / "allocation.png",
        )
    return {"keep_ratios": alloc.keep_ratios}


def _slice(
    model_spec: str,
    stats_path: Path,
    allocation_path: Path,
    cfg: PruneConfig,
    out: Path,
    dtype: str,
    tokens: Path | None,
    device: str = "cpu",
) -> dict:
    """The streamed engine's pass 2 from a capture and an allocation: each block read,
    folded from its own statistics file (or, stats=sequential, from a forward over `tokens`
    through the pruned blocks; stats=target, also through the dense block first), and
    written; then tokenizer, card and manifest. The allocation stage's artifact gives the kept
    indices and the record of the control chosen, which the manifest carries on."""
    from transformers import AutoTokenizer

    from cfsp.engine.dense_target import target_stats
    from cfsp.engine.streamed import Captured, Spill, prune_streamed, sequential_stats
    from cfsp.engine.streamed_weights import consolidate
    from cfsp.export import MAX_SHARD_SIZE
    from cfsp.io import parse_shard_size
    from cfsp.models import parse_dtype
    from cfsp.pruning_streamed import write_rest

    plan, choice = _load_allocation(allocation_path)
    check_output_dir(out)
    folder, blocks, meta = _load_moments(stats_path)
    windows = _load_tokens(tokens) if tokens is not None else None
    path, revision, config = _source(model_spec)
    spill = None
    if not (sequential_stats(cfg) or target_stats(cfg)):
        spill = Spill(folder, check_grams(folder, meta, len(blocks)))
    skeleton_params = _dense_params(config, dtype)
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        outcome = prune_streamed(
            path, windows, cfg, tmp, parse_dtype(dtype), resolve_device(device), config=config,
            captured=Captured(plan, spill, choice),
        )  # fmt: skip
        outcome.stream["consolidated"] = consolidate(tmp, parse_shard_size(MAX_SHARD_SIZE))
        loaded = SimpleNamespace(path=str(path), revision=revision, model=outcome.shadow)
        manifest = build_manifest(
            model_spec,
            loaded,
            meta.get("fingerprint", {}),
            outcome.report,
            skeleton_params,
            {"capture": meta.get("wall_s", 0.0), "slice": round(time.perf_counter() - start, 3)},
            stream=outcome.stream,
        )
        write_rest(path, AutoTokenizer.from_pretrained(path), tmp, manifest, outcome.custom_code)
    report = outcome.report
    return {"achieved_fraction": report.achieved_fraction, "params_after": manifest["params_after"]}


def _dense_params(config, dtype: str) -> int:
    from cfsp.engine.streamed_weights import empty_model
    from cfsp.models import parse_dtype

    return count_params(empty_model(config, parse_dtype(dtype)))


def _load_allocation(path: Path) -> tuple[PrunePlan, dict]:
    """The allocation stage's artifact: per-block keep ratios and kept indices, and the
    record of `control: auto`'s choice ({} when none was made)."""
    alloc_file = Path(path)
    alloc_file = alloc_file / ALLOCATION if alloc_file.is_dir() else alloc_file
    data = read_json(alloc_file, expect=dict)
    try:
        alloc = PrunePlan.from_dict(data)
        if len(alloc.keep_ratios) != len(alloc.blocks):
            raise ValueError("keep_ratios and blocks differ in length")
    except (KeyError, TypeError, ValueError) as err:
        raise CfspError(f"{alloc_file} is not an allocation ({_what(err)})") from err
    choice = data.get("control_choice", {})
    if not isinstance(choice, dict):
        raise CfspError(f"{alloc_file} is not an allocation (control_choice is not a mapping)")
    return alloc, choice


def prune_stage(
    model_spec: str,
    stats_path: Path,
    allocation_path: Path,
    cfg: PruneConfig,
    out: Path,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """Slice the dense model to the allocation, with no compensation."""
    cfg = cfg.model_copy(update={"reconstruct": "none"})
    return _slice(model_spec, stats_path, allocation_path, cfg, out, dtype, None, device)


def reconstruct_stage(
    model_spec: str,
    allocation_path: Path,
    stats_path: Path,
    cfg: PruneConfig,
    out: Path,
    tokens: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """Slice the dense model to the allocation artifact's kept indices, folding the pruned
    inputs into the kept ones (cfg.reconstruct), on `device`."""
    return _slice(
        model_spec,
        stats_path,
        allocation_path,
        cfg,
        out,
        dtype,
        tokens if cfg.stats in ("sequential", "target") else None,
        device,
    )


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) every file of `src` into `dst`: a pass-through costs no space."""
    import os
    import shutil

    for path in src.iterdir():
        if path.is_file():
            try:
                os.link(path, dst / path.name)
            except OSError:
                shutil.copy2(path, dst / path.name)


def recover_stage(
    model_dir: Path,
    stats_path: Path,
    cfg: RecoverConfig,
    out: Path,
    dtype: str = "float32",
    temperature: float = 1.0,
    control: float | str = 0.5,
    on_step=None,
    device: str = "cpu",
) -> dict:
    """LoRA on the pruned checkpoint, merged back (cfsp.recover); ranks follow the blocks' coarse
    importance when cfg.mode == "ig". Disabled: `out` is the input checkpoint, hard-linked."""
    import torch

    from cfsp.engine.allocate import DEFAULT_CONTROL, coarse_scores
    from cfsp.recover import recover

    torch_device = resolve_device(device)
    check_output_dir(out)
    model_dir = Path(model_dir)
    if not cfg.enabled:
        with atomic_dir(out) as tmp:
            _link_tree(model_dir, tmp)
        return {"enabled": False}
    stats_dir = Path(stats_path)
    stats_dir = stats_dir if stats_dir.is_dir() else stats_dir.parent
    try:
        angular = torch.tensor(read_json(stats_dir / "capture.json", expect=dict)["angular"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CfspError(
            f"{stats_dir}/capture.json records no angular distances ({_what(err)})"
        ) from err
    if control == "auto":  # the ranks follow the allocation's default slope
        control = DEFAULT_CONTROL
    importance = coarse_scores(angular, temperature, control).tolist()
    loaded = load_model(str(model_dir), dtype=dtype)
    loaded.model.to(torch_device)
    windows = calibration_windows(
        cfg.source, loaded.tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, loaded.model
    )
    model, record = recover(loaded.model, windows.ids, importance, cfg, on_step=on_step)
    model.to("cpu")  # written from host memory
    record.update(config=cfg.model_dump(), importance=importance, text=windows.fingerprint)
    manifest = dict(read_manifest(model_dir), recover=record)
    with atomic_dir(out) as tmp:
        save_checkpoint(model, loaded.tokenizer, tmp, manifest)
        loss_plot(record["losses"], f"recover {cfg.mode} rank {cfg.rank}", tmp / "recover_loss.png")
    log.info(
        "recover %s: %d steps, loss %.4f -> %.4f, %d trainable params, %.1fs",
        cfg.mode,
        cfg.steps,
        record["losses"][0],
        record["losses"][-1],
        record["trainable_params"],
        record["wall_s"],
    )
    return {k: record[k] for k in ("mode", "ranks", "trainable_params", "losses", "wall_s")}


def evaluate_stage(
    model_dir: str,
    cfg: EvalConfig,
    out: Path,
    dtype: str = "float32",
    reference: str | None = None,
    device: str = "cpu",
) -> dict:
    """Perplexity on each source at cfg.seqlen, parameter count, zero-shot accuracy and speed
    against `reference` when configured, on `device` -> out/metrics.json."""
    resolve_device(device)
    check_output_dir(out)
    metrics = evaluate_model(str(model_dir), cfg, dtype, reference=reference, device=device)
    with atomic_dir(out) as tmp:
        write_json(tmp / METRICS, metrics)
        write_json(tmp / "evaluate.json", {"config": cfg.model_dump(), "reference": reference})
    return metrics
