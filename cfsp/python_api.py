"""The Python API behind `cfsp.prune`, `cfsp.save_pruned` and `cfsp.evaluate`.

    model, tokenizer, report = cfsp.prune("smollm2-135m", budget=0.3, calibration="c4")
    cfsp.save_pruned(model, tokenizer, "out/pruned", report)
    model = cfsp.load_pruned("out/pruned")

`prune` takes a model spec (as the CLI does) or a loaded causal LM and its tokenizer, and
calibration text as a spec, a list of strings or a `datasets.Dataset`; it runs the same code as
`cfsp prune` (capture, plan, reconstruct, slice) and returns the pruned model, its tokenizer
and the report a checkpoint's manifest holds. A spec naming safetensors on disk (a directory
or an alias) is pruned by the block-streamed engine, as `cfsp prune` does, into a temporary
checkpoint that is then loaded (`load_pruned`); a loaded model is pruned in place by the
in-memory engine (its weights are already in memory).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

from cfsp.config import HELDOUT_WINDOWS, CalibConfig, EvalConfig, PruneConfig, validate
from cfsp.data import Text, check_source, windows_for
from cfsp.errors import UsageError
from cfsp.evaluation.from_spec import evaluate_loaded, evaluate_model
from cfsp.export import save_checkpoint
from cfsp.io import atomic_dir, check_replaceable, check_writable_parent
from cfsp.models import LoadedModel, check_model_spec, load_model
from cfsp.preflight import check_evaluation
from cfsp.pruning import prune_loaded


class Pruned(NamedTuple):
    """What `cfsp.prune` returns: unpack as `model, tokenizer, report = cfsp.prune(...)`."""

    model: Any
    tokenizer: Any
    report: dict


def prune(
    model,
    tokenizer=None,
    calibration="botchan:train",
    budget: float = 0.3,
    method: str = "cfsp",
    *,
    nsamples: int = 128,
    seqlen: int = 128,
    seed: int = 0,
    heldout: int = HELDOUT_WINDOWS,
    text_column: str = "text",
    dtype: str = "float32",
    batch_size: int = 8,
    trust_remote_code: bool = False,
    progress: bool = False,
    **options,
) -> Pruned:
    """Prune a causal LM to `budget` (fraction of decoder-block weights removed) by `method`.

    model        a spec (`smollm2-135m`, a directory, a hub id) or a loaded model (pruned in
                 place; then `tokenizer` is required)
    calibration  a text source spec (`c4`, `wikitext2`, `botchan:train`, a file), a list of
                 strings, or a `datasets.Dataset` (its `text_column`); `nsamples` windows of
                 `seqlen` tokens are drawn from it with `seed`, and `heldout` more beside
                 them on which `control="auto"` (the default) chooses the allocation's slope
    method       a preset (`cfsp`, `flap`, `wanda_sp`, ...); `**options` sets any other
                 `PruneConfig` field: allocation, criterion, reconstruct, structures, round_to,
                 temperature, stats, damping, ...
    Returns `Pruned(model, tokenizer, report)`; `report` is the manifest `save_pruned` writes.
    Bad arguments raise `cfsp.errors.UsageError` before any work.
    """
    cfg = validate(PruneConfig, {"budget": budget, "method": method, **options}, "prune options")
    source = calibration if isinstance(calibration, str) else "python"
    calib = validate(
        CalibConfig,
        {
            "source": source,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": seed,
            "heldout": heldout,
        },
        "calibration",
    )
    text = _calibration_text(calibration, text_column)
    if isinstance(model, str):
        from cfsp.pruning_streamed import engine_for

        check_model_spec(model, trust_remote_code)
        if engine_for(model, "compact", None, trust_remote_code):
            return _prune_streamed(model, calib, cfg, text, dtype, batch_size, trust_remote_code)
    timings: dict = {}
    t0 = time.perf_counter()
    loaded = _loaded(model, tokenizer, dtype, trust_remote_code)
    windows = windows_for(calib, loaded.tokenizer, loaded.model, text)
    timings["load_and_prepare"] = time.perf_counter() - t0
    dtype_name = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    _, manifest = prune_loaded(
        loaded, windows, cfg, calib, timings, batch_size, progress, dtype=dtype_name
    )
    return Pruned(loaded.model, loaded.tokenizer, manifest)


def _prune_streamed(spec: str, calib, cfg, text, dtype: str, batch: int, trust: bool) -> Pruned:
    """`cfsp prune`'s default engine into a temporary checkpoint, loaded back."""
    import tempfile

    from transformers import AutoTokenizer

    from cfsp.export import load_pruned
    from cfsp.models import parse_dtype
    from cfsp.pruning_streamed import prune_streamed_to_checkpoint

    with tempfile.TemporaryDirectory(prefix="cfsp-prune-") as scratch:
        out = Path(scratch) / "pruned"
        manifest = prune_streamed_to_checkpoint(
            spec, calib, cfg, out, dtype, "cpu", trust, batch, text=text
        )
        model = load_pruned(out, parse_dtype(dtype)).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
    for key in ("exports", "files_sha256", "weights_sha256", "export"):
        manifest.pop(key, None)  # they described the temporary folder
    return Pruned(model, tokenizer, manifest)


def _calibration_text(calibration, column: str) -> Text | None:
    """The in-memory calibration text, or None for a spec (checked here, loaded later)."""
    if isinstance(calibration, str):
        check_source(calibration, "calibration")
        return None
    if hasattr(calibration, "column_names"):  # a datasets.Dataset
        if column not in calibration.column_names:
            raise UsageError(
                f"calibration dataset has no column {column!r} "
                f"(columns: {', '.join(calibration.column_names)}); pass text_column="
            )
        texts, origin = list(calibration[column]), f"datasets.Dataset[{column}]"
    elif isinstance(calibration, (list, tuple)):
        texts, origin = list(calibration), "python list"
    else:
        raise UsageError(
            "calibration must be a text source spec, a list of strings or a datasets.Dataset, "
            f"not {type(calibration).__name__}"
        )
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UsageError("calibration texts must be a non-empty list of strings")
    return Text("\n\n".join(texts), f"{origin} ({len(texts)} texts)", origin)


def _loaded(model, tokenizer, dtype: str, trust_remote_code: bool) -> LoadedModel:
    if isinstance(model, str):
        check_model_spec(model, trust_remote_code)
        return load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise UsageError("a loaded model needs its tokenizer: cfsp.prune(model, tokenizer, ...)")
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise UsageError(f"model must be a spec or a loaded causal LM, not {type(model).__name__}")
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    model.eval()
    return LoadedModel(model, tokenizer, spec=name, path=name, revision="in-memory")


def save_pruned(model, tokenizer, out, report: dict | None = None, overwrite: bool = False):
    """Write a pruned model as a cfsp checkpoint directory (what `cfsp prune --out` writes):
    safetensors weights, config with per-block widths, tokenizer, shipped modeling file where
    needed, and `cfsp_manifest.json` holding `report` plus the sha256 of every file. Refuses
    an existing `out` unless `overwrite` (and then only an empty folder or a cfsp output).
    Returns the directory."""
    out = check_writable_parent(out)
    if overwrite:
        check_replaceable(out)
    elif out.exists():
        raise UsageError(f"{out} already exists; pass overwrite=True or choose another folder")
    with atomic_dir(out) as tmp:
        save_checkpoint(model, tokenizer, tmp, dict(report or {}))
    return Path(out)


def evaluate(
    model,
    tokenizer=None,
    *,
    dtype: str = "float32",
    reference: str | None = None,
    trust_remote_code: bool = False,
    **options,
) -> dict:
    """Perplexity (and optionally zero-shot accuracy, speed) of a model spec or loaded model.

    `**options` sets any `EvalConfig` field: perplexity (text source specs, default the
    embedded Botchan test part), seqlen, limit, batch_tokens, tasks, task_limit, speed (a dict:
    {"enabled": True, ...}, measured against the `reference` spec when given). Returns the
    JSON-ready result `cfsp eval` writes.
    """
    cfg = validate(EvalConfig, options, "evaluation options")
    if isinstance(model, str):
        return evaluate_model(model, cfg, dtype, trust_remote_code, reference)
    check_evaluation(cfg.perplexity, cfg.tasks)
    if reference is not None:
        check_model_spec(reference, trust_remote_code)
    return evaluate_loaded(_loaded(model, tokenizer, dtype, trust_remote_code), cfg, reference)
