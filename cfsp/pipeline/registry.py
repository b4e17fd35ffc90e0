"""The stage registry: each pipeline stage declared once.

A `Stage` names its library function, the upstream stages whose artifacts it reads, the files
it writes, the params.yaml sections its output depends on, and the library sources it runs.
From this one table come the Prefect tasks (cfsp.pipeline.tasks), the `cfsp stage` commands
(cfsp.cli), the stage records' keys and folders (cfsp.pipeline.store) and the checks that
dvc.yaml declares the same graph (tests/test_registry.py).

Every stage is called the same way, `run_stage(name, ctx)`: a `StageContext` holds the model,
the upstream artifact folders by stage name, the declared parameter sections, the resolved
pruning config of a (method, budget) run, and the output folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cfsp.config import CalibConfig, EvalConfig, Params, PruneConfig, RecoverConfig
from cfsp.export import MANIFEST
from cfsp.pipeline import stages
from cfsp.pipeline.keys import digest


@dataclass
class StageContext:
    """What one stage run gets: every field a stage may read, filled by the CLI or the flow."""

    model: str
    out: Path
    inputs: dict[str, Path] = field(default_factory=dict)  # upstream stage -> artifact folder
    sections: dict = field(default_factory=dict)  # declared params sections -> values
    prune: dict | None = None  # prune_config(params, method, budget), per-method stages
    reference: str | None = None  # dense model for speed ratios (evaluate)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as declared to every orchestrator."""

    name: str
    call: Callable[[StageContext], dict]  # runs the library function in cfsp.pipeline.stages
    inputs: tuple[str, ...]  # upstream stages whose artifacts it reads
    artifacts: tuple[str, ...]  # files it writes; the first identifies its content
    params: tuple[str, ...]  # params.yaml sections (dotted for one key) its output depends on
    code: tuple[str, ...]  # library sources it runs (DVC deps)
    per_method: bool  # one per (model, budget, method), else one per model
    enabled_by: str | None = None  # a params flag; off: `cfsp run` passes its last input on

    @property
    def artifact(self) -> str:
        return self.artifacts[0]

    @property
    def command(self) -> str:
        """The `cfsp stage` command that runs it (evaluate-dense: `evaluate` without
        --reference)."""
        return self.name.removesuffix("-dense")


def _prune(ctx: StageContext) -> PruneConfig:
    return PruneConfig(**ctx.prune)


def _prepare(ctx: StageContext) -> dict:
    calib = CalibConfig(**ctx.sections["prepare"])
    return stages.prepare(ctx.model, calib, ctx.out, ctx.sections["dtype"])


def _capture(ctx: StageContext) -> dict:
    s = ctx.sections
    tokens, batch = ctx.inputs["prepare"], s["capture"]["batch_size"]
    return stages.capture_stage(ctx.model, tokens, ctx.out, batch, s["dtype"], s["device"])


def _allocate(ctx: StageContext) -> dict:
    stats, dtype = ctx.inputs["capture"], ctx.sections["dtype"]
    return stages.allocate_stage(
        ctx.model, stats, _prune(ctx), ctx.out, dtype, ctx.sections["device"], ctx.inputs["prepare"]
    )


def _prune_call(ctx: StageContext) -> dict:
    stats, alloc, s = ctx.inputs["capture"], ctx.inputs["allocate"], ctx.sections
    cfg = _prune(ctx)
    return stages.prune_stage(ctx.model, stats, alloc, cfg, ctx.out, s["dtype"], s["device"])


def _reconstruct(ctx: StageContext) -> dict:
    i = ctx.inputs
    return stages.reconstruct_stage(
        ctx.model, i["allocate"], i["capture"], _prune(ctx), ctx.out, i["prepare"],
        ctx.sections["dtype"], ctx.sections["device"],
    )  # fmt: skip


def _recover(ctx: StageContext) -> dict:
    s = ctx.sections
    return stages.recover_stage(
        ctx.inputs["reconstruct"], ctx.inputs["capture"], RecoverConfig(**s["recover"]), ctx.out,
        s["dtype"], s["allocate.temperature"], s["allocate.control"], device=s["device"],
    )  # fmt: skip


def _evaluate(ctx: StageContext) -> dict:
    cfg, dtype = EvalConfig(**ctx.sections["evaluate"]), ctx.sections["dtype"]
    model = str(ctx.inputs.get("recover", ctx.model))
    return stages.evaluate_stage(model, cfg, ctx.out, dtype, ctx.reference, ctx.sections["device"])


CHECKPOINT = (MANIFEST,)  # a checkpoint is identified by its manifest's files_sha256
RUNNER = "cfsp/pipeline/stages.py"
STREAMED = "cfsp/pruning_streamed.py"  # the model stages run the streamed engine's passes
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", _prepare, (), (stages.TOKENS, "prepare.json"), ("prepare", "dtype"),
              ("cfsp/data.py", "cfsp/embedded.py", RUNNER), per_method=False),
        Stage("capture", _capture, ("prepare",), (stages.STATS, "capture.json"),
              ("capture", "dtype", "device"), ("cfsp/engine", STREAMED, RUNNER), per_method=False),
        Stage("evaluate-dense", _evaluate, (), (stages.METRICS, "evaluate.json"),
              ("evaluate", "dtype", "device"), ("cfsp/evaluation", RUNNER), per_method=False),
        Stage("allocate", _allocate, ("prepare", "capture"), (stages.ALLOCATION, "allocation.png"),
              ("allocate", "reconstruct", "dtype", "device"),
              ("cfsp/engine", STREAMED, RUNNER),
              per_method=True),
        Stage("prune", _prune_call, ("capture", "allocate"), CHECKPOINT, ("dtype", "device"),
              ("cfsp/engine", "cfsp/export.py", STREAMED, RUNNER), per_method=True),
        Stage("reconstruct", _reconstruct, ("prepare", "capture", "allocate"), CHECKPOINT,
              ("allocate", "reconstruct", "dtype", "device"),
              ("cfsp/engine", STREAMED, RUNNER), per_method=True),
        Stage("recover", _recover, ("capture", "reconstruct"), CHECKPOINT,
              ("recover", "allocate.temperature", "allocate.control", "dtype", "device"),
              ("cfsp/recover.py", RUNNER), per_method=True, enabled_by="recover.enabled"),
        Stage("evaluate", _evaluate, ("recover",), (stages.METRICS, "evaluate.json"),
              ("evaluate", "dtype", "device"), ("cfsp/evaluation", RUNNER), per_method=True),
    )
}  # fmt: skip


# dvc.yaml's final stage, `cfsp stage track` (not a Stage: one per sweep, after every run's
# evaluation, whose metrics/ files are its data dependency): the sweep's MLflow runs.
TRACK = "track"
TRACK_CODE = (
    "cfsp/pipeline/publish.py",
    "cfsp/pipeline/lineage.py",
    "cfsp/report.py",
    "cfsp/tracking.py",
    "cfsp/tracking_io.py",
)
TRACK_PARAMS = ("models", "budgets", "methods", "export", "tracking")


def _lookup(params: Params, dotted: str):
    value = params.model_dump()
    for part in dotted.split("."):
        value = value[part]
    return value


def enabled(stage: str, params: Params) -> bool:
    """Whether `stage` runs under `params` (a disabled one passes its last input on)."""
    flag = STAGES[stage].enabled_by
    return flag is None or bool(_lookup(params, flag))


def sections(stage: str, params: Params) -> dict:
    """The parameter sections `stage` declares, as plain values ("a.b" picks one key of a)."""
    return {name: _lookup(params, name) for name in STAGES[stage].params}


def content_hash(stage: str, out: Path) -> str:
    """A content hash of a stage's output: its first artifact's sha256, or for a checkpoint
    (however many weight shards) a digest of its manifest's per-file sha256."""
    from cfsp.io import sha256_file

    artifact = Path(out) / STAGES[stage].artifact
    if artifact.name == MANIFEST:
        return digest(json.loads(artifact.read_text())["files_sha256"])
    return sha256_file(artifact)


def run_stage(name: str, ctx: StageContext) -> dict:
    """Run one declared stage (the only way the CLI and the Prefect tasks call a stage)."""
    stage = STAGES[name]
    missing = [s for s in stage.inputs if s not in ctx.inputs]
    if missing:
        raise ValueError(f"stage {name} needs the artifacts of {', '.join(missing)}")
    return stage.call(ctx)
