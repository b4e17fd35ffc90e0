"""Check a whole request before any work starts.

A run that would fail on its fifth stage because an evaluation source is missing wastes minutes
and leaves half a sweep behind. Every spec of a request is resolved here first, reading only
configs, headers and directory entries (seconds at most, whatever the model's size): models,
the calibration text, every evaluation text, zero-shot tasks, LoRA training text (when recovery
is on) and the output folder. The first problem raises a UsageError (exit 2, one line).
"""

from __future__ import annotations

from pathlib import Path

from cfsp.config import Params
from cfsp.data import check_source
from cfsp.io import check_writable_parent
from cfsp.models import check_model_spec


def check_evaluation(perplexity: list[str], tasks: list[str]) -> None:
    """Every evaluation text resolves and every zero-shot task has its data files."""
    for source in perplexity:
        check_source(source, "evaluation")
    if tasks:
        from cfsp.evaluation.zeroshot import check_tasks

        check_tasks(tasks)


def check_params(params: Params) -> None:
    """Every model, text source, task, output location and the device of a params.yaml
    request (`cuda` on a machine without one fails here, before Prefect starts)."""
    from cfsp.devices import resolve_device

    resolve_device(params.device)
    for model in params.models:
        check_model_spec(model)
    check_source(params.prepare.source, "calibration")
    check_evaluation(params.evaluate.perplexity, params.evaluate.tasks)
    if params.recover.enabled:
        check_source(params.recover.source, "training")
    check_writable_parent(Path(params.output) / "dvc")
    check_stock_exports(params)


def check_stock_exports(params: Params) -> None:
    """The stock-loadable exports asked for (padded, uniform) can be written for every model x
    method x budget (cfsp.export.check_exports): refused now, not after pruning. Models whose
    config is not on disk yet (hub ids, GGUF files) are checked when their export is written."""
    from cfsp.config import prune_config
    from cfsp.export import check_exports
    from cfsp.models import local_config

    if not {"padded", "uniform"} & set(params.export.kinds):
        return
    for model in params.models:
        config = local_config(model)
        if config is None:
            continue
        for method in params.methods:
            for budget in params.budgets:
                check_exports(config, prune_config(params, method, budget), params.export.kinds)
