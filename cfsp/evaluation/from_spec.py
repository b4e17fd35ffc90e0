"""Evaluation entry points that load what they need from specs (used by the CLI and stages)."""

from __future__ import annotations

import logging
import time

from cfsp import __version__
from cfsp.config import EvalConfig
from cfsp.data import evaluation_windows
from cfsp.devices import resolve_device
from cfsp.evaluation.perplexity import perplexity
from cfsp.models import LoadedModel, check_model_spec, count_params, load_model
from cfsp.preflight import check_evaluation

log = logging.getLogger(__name__)


def evaluate_model(
    model_spec: str,
    cfg: EvalConfig,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    reference: str | None = None,
    device: str | None = "cpu",
) -> dict:
    """Load the model once onto `device` (cfsp.devices), score each text source; return a
    JSON-ready result.

    With cfg.speed.enabled, speed and memory are measured too: against `reference` (the dense
    model, loaded into the same process, every figure also as a ratio) or alone without one.
    """
    torch_device = resolve_device(device)
    check_model_spec(model_spec, trust_remote_code)
    check_evaluation(cfg.perplexity, cfg.tasks)
    if reference is not None:
        check_model_spec(reference, trust_remote_code)
    start = time.perf_counter()
    loaded = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    loaded.model.to(torch_device)
    result = evaluate_loaded(loaded, cfg, reference, trust_remote_code)
    result.update(dtype=dtype, wall_s=round(time.perf_counter() - start, 3))
    return result


def evaluate_loaded(
    loaded: LoadedModel,
    cfg: EvalConfig,
    reference: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Score a model already in memory, on the device it is on (perplexity per source,
    zero-shot tasks, speed; the dense `reference` is loaded onto the same device)."""
    start = time.perf_counter()
    # Build every window set first: a bad source fails before minutes of scoring.
    windows = {
        s: evaluation_windows(s, loaded.tokenizer, cfg.seqlen, cfg.limit, loaded.model)
        for s in cfg.perplexity
    }
    rows = {}
    for source, win in windows.items():
        rows[source] = perplexity(loaded.model, win, cfg.batch_tokens, desc=f"ppl {source}")
        rows[source]["fingerprint"] = win.fingerprint
        log.info(
            "%s: ppl %.4f over %d windows of %d tokens",
            source,
            rows[source]["ppl"],
            rows[source]["windows"],
            cfg.seqlen,
        )
    zero = None
    if cfg.tasks:
        from cfsp.evaluation.zeroshot import zeroshot

        zero = zeroshot(loaded.model, loaded.tokenizer, cfg.tasks, cfg.task_limit)
        log.info(
            "zero-shot average acc %.4f over %s (first %s items each)",
            zero["average_acc"],
            ", ".join(cfg.tasks),
            cfg.task_limit,
        )
    speed = _speed(loaded.model, cfg, reference, trust_remote_code) if cfg.speed.enabled else None
    return {
        "model": loaded.spec,
        "model_path": loaded.path,
        "revision": loaded.revision,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(loaded.model.parameters()).device),
        "params": count_params(loaded.model),
        "seqlen": cfg.seqlen,
        "limit": cfg.limit,
        "perplexity": rows,
        "zeroshot": zero,
        "speed": speed,
        "reference": reference,
        "cfsp_version": __version__,
        "wall_s": round(time.perf_counter() - start, 3),
    }


def _speed(model, cfg: EvalConfig, reference: str | None, trust_remote_code: bool) -> dict:
    from cfsp.evaluation.speed import compare, measure

    if reference is None:
        return {"config": cfg.speed.model_dump(), "dtypes": measure({"model": model}, cfg.speed)}
    dense = load_model(reference, dtype="float32", trust_remote_code=trust_remote_code).model
    dense.to(next(model.parameters()).device)
    result = compare(dense, model, cfg.speed)
    for dtype, row in result["dtypes"].items():
        log.info(
            "%s speed vs %s: prefill x%.2f (ideal x%.2f), decode x%.2f, memory x%.2f",
            dtype,
            reference,
            row["prefill_speedup"],
            row["ideal_speedup"],
            row["decode_speedup"],
            row["memory_ratio"],
        )
    return result
