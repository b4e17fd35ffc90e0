"""The flat metric schema every consumer shows, and the one table renderer.

Names are grouped by a `/` prefix (MLflow and DVC group them in their UIs):

    params/count            parameters of the evaluated model
    params/kept_fraction    params/count over the dense model's            (needs dense)
    params/removed_fraction block parameters removed by the pruning        (needs prune)
    ppl/<source>_s<L>       perplexity on <source> at seqlen L; `_ratio`: over dense
    zeroshot/<task>         accuracy (lm-eval acc); zeroshot/average; `_ratio`: over dense
    speed/<figure>_<dtype>  dtype tag fp32|bf16|fp16; figures: prefill, decode (speed-ups,
                            dense time / pruned time), ideal (dense MACs / pruned MACs),
                            memory (peak ratio), prefill_tok_s, decode_ms, peak_mib, macs
    time/<stage>_s          wall time of each pipeline stage; time/capture_pass_s: the capture
                            pass alone
    recover/trainable_params, recover/final_loss   LoRA healing, when run

`flatten` builds it from an evaluation result (cfsp.evaluate.api.evaluate_model's JSON) and
what the pipeline knows about the run; `render_table` draws every table (reports, CLI,
Prefect artifacts, benchmarks) as markdown.
"""

from __future__ import annotations

import re

DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SPEED_FIGURES = {  # schema figure -> (key in a speed row, key in its per-model figures)
    "prefill": ("prefill_speedup", None),
    "decode": ("decode_speedup", None),
    "ideal": ("ideal_speedup", None),
    "memory": ("memory_ratio", None),
    "prefill_tok_s": (None, "prefill_tok_s"),
    "decode_ms": (None, "decode_ms_per_token"),
    "peak_mib": (None, "peak_memory_mib"),
    "macs": (None, "macs_per_token"),
}


def source_slug(source: str) -> str:
    """A text source spec as a metric name part (`botchan:test` -> `botchan-test`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-")[:60]


def ppl_name(source: str, seqlen: int) -> str:
    return f"ppl/{source_slug(source)}_s{seqlen}"


def _quality(evaluation: dict) -> dict[str, float]:
    """Perplexity per source and zero-shot accuracy per task (no ratios)."""
    out = {
        ppl_name(source, evaluation["seqlen"]): float(row["ppl"])
        for source, row in evaluation["perplexity"].items()
    }
    zero = evaluation.get("zeroshot")
    if zero:
        out.update({f"zeroshot/{t}": float(r["acc"]) for t, r in zero["tasks"].items()})
        out["zeroshot/average"] = float(zero["average_acc"])
    return out


def _speed(evaluation: dict) -> dict[str, float]:
    out = {}
    for dtype, row in ((evaluation.get("speed") or {}).get("dtypes") or {}).items():
        figures = row.get("pruned") or row.get("model") or {}
        for name, (ratio_key, figure_key) in SPEED_FIGURES.items():
            value = row.get(ratio_key) if ratio_key else figures.get(figure_key)
            if value is not None:
                out[f"speed/{name}_{DTYPE_TAGS.get(dtype, dtype)}"] = float(value)
    return out


def flatten(
    evaluation: dict,
    dense: dict | None = None,
    removed_fraction: float | None = None,
    timings: dict[str, float] | None = None,
    recover: dict | None = None,
) -> dict[str, float]:
    """The flat metrics of one evaluated model: quality, size and speed, each quality figure
    also as a ratio to `dense` (the dense model's evaluation), plus what the run adds: the
    removed fraction, stage timings ({stage: seconds}) and the recover stage's record."""
    out = {"params/count": float(evaluation["params"])}
    quality = _quality(evaluation)
    out.update(quality)
    if dense is not None:
        out["params/kept_fraction"] = evaluation["params"] / dense["params"]
        base = _quality(dense)
        for name, value in quality.items():
            if base.get(name):
                out[f"{name}_ratio"] = value / base[name]
    if removed_fraction is not None:
        out["params/removed_fraction"] = float(removed_fraction)
    out.update(_speed(evaluation))
    out.update({f"time/{stage}_s": float(s) for stage, s in (timings or {}).items()})
    if recover:
        out["recover/trainable_params"] = float(recover["trainable_params"])
        out["recover/final_loss"] = float(recover["losses"][-1])
    return dict(sorted(out.items()))


def group(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics of one group, keyed by the rest of their name (`ppl/x_s8` -> `x_s8`)."""
    head = prefix.rstrip("/") + "/"
    return {k[len(head) :]: v for k, v in metrics.items() if k.startswith(head)}


def _cell(value) -> str:
    if value is None:
        return "-"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of `rows` (dicts of column -> cell; a missing or None cell is `-`,
    floats get 6 significant digits). Columns: `columns`, else every key in first-seen order."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
