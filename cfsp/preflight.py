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
    """Every model, text source, task and output location of a params.yaml request."""
    for model in params.models:
        check_model_spec(model)
    check_source(params.prepare.source, "calibration")
    check_evaluation(params.evaluate.perplexity, params.evaluate.tasks)
    if params.recover.enabled:
        check_source(params.recover.source, "training")
    check_writable_parent(Path(params.output) / "dvc")
