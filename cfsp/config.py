"""Typed, validated parameters. Unknown keys are rejected; the applied config is saved with
every output. Method presets fill allocation / criterion / reconstruction unless overridden."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cfsp.devices import DEVICE_PATTERN
from cfsp.engine.registry import ALLOCATIONS, CRITERIA, PRESETS, RECONSTRUCTIONS
from cfsp.errors import UsageError

# The names a config may give, from the engine's registries (a tuple subscript is a Literal of
# its items), so pydantic's schema and messages list exactly what is registered.
AllocationName = Literal[ALLOCATIONS.names()]
CriterionName = Literal[CRITERIA.names()]
ReconstructionName = Literal[RECONSTRUCTIONS.names()]


# Upper bounds that keep a request within what one machine can hold: token windows are
# materialised as int64 ids (2**25 tokens = 256 MiB), and torch seeds are 64-bit.
MAX_TOKENS = 1 << 25
MAX_COUNT = 1 << 20  # windows, items, steps: a count beyond this is a typo, not a request
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="torch accepts 64-bit seeds")]
Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]


class Strict(BaseModel):
    """Unknown keys are errors, and no float may be NaN or infinite (an infinite damping or
    temperature passes `gt=0` and only fails deep inside the linear algebra)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_tokens(count: int | None, seqlen: int, where: str) -> None:
    """Refuse windows x seqlen beyond MAX_TOKENS before anything is allocated."""
    if count is not None and count * seqlen > MAX_TOKENS:
        raise ValueError(
            f"{where}: {count} windows x {seqlen} tokens = {count * seqlen:,} tokens, more than "
            f"the {MAX_TOKENS:,} one run may hold; lower the count or the seqlen"
        )


# Held-out windows drawn beside the calibration ones and kept out of the statistics: the text
# on which `control: auto` compares its candidates (cfsp.engine.choose). 16 windows chose the
# same control as 32 in all 8 validation runs (2 models x 4 budgets, README) for half the cost
# (~0.12 F per candidate at 128 calibration windows).
HELDOUT_WINDOWS = 16


class CalibConfig(Strict):
    source: str = "botchan:train"  # embedded; disjoint from the default evaluation text
    nsamples: Count = 128
    seqlen: Count = 128
    seed: Seed = 0
    heldout: int = Field(HELDOUT_WINDOWS, ge=0, le=MAX_COUNT)  # 0: none (control auto = 0.5)

    @model_validator(mode="after")
    def _bounded(self) -> CalibConfig:
        check_tokens(self.nsamples + self.heldout, self.seqlen, "(nsamples + heldout) x seqlen")
        return self


class AllocateConfig(Strict):
    """Everything that decides what is kept (besides budget and method)."""

    # FFN-only is the default: on SmolLM2-135M it beat FFN+heads on WikiText-2 *validation*
    # text at p=0.2 and p=0.5 (README, "Measured"); ffn+heads stays one option away.
    structures: Literal["ffn+heads", "ffn"] = "ffn"
    temperature: float = Field(1.0, gt=0)
    # "auto" chooses 0.5 or 0 (uniform) by the loss each leaves on held-out calibration
    # windows (cfsp.engine.choose): the best slope differs by model and budget (README).
    control: float | Literal["auto"] = "auto"
    floor: float = Field(0.05, gt=0, lt=1)
    # "auto" resolves by budget (`criterion_exponent`): measured on validation text, 0.25 gains
    # on both models up to p = 0.2 and SmolLM2 loses with it from p = 0.3 on (README).
    exponent: float | Literal["auto"] = "auto"
    round_to: Literal[1, 8, 64, 128] = 1
    seed: Seed = 0

    @field_validator("exponent", "control", mode="before")
    @classmethod
    def _auto_or_number(cls, value):
        # One message instead of pydantic's one per member of the union.
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ValueError(f"expected 'auto' or a finite number >= 0, got {value!r}")
        return number


class ReconstructConfig(Strict):
    damping: float = Field(0.1, gt=0)
    stats: Literal["dense", "sequential", "target"] = "dense"


class PruneConfig(AllocateConfig, ReconstructConfig):
    """Budget and method preset, plus every allocation and reconstruction parameter."""

    budget: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="fraction of decoder-block weight parameters removed",
    )
    method: str = "cfsp"
    allocation: AllocationName | None = None
    criterion: CriterionName | None = None
    reconstruct: ReconstructionName | None = None

    @model_validator(mode="after")
    def _fill_preset(self) -> PruneConfig:
        if self.method not in PRESETS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.method]
        for key in ("allocation", "criterion", "reconstruct"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset[key])
        if self.exponent == "auto":
            object.__setattr__(self, "exponent", criterion_exponent(self.budget))
        return self


def criterion_exponent(budget: float) -> float:
    """The CFSP criterion's exponent c on ||X_j|| that `exponent: auto` picks for a budget:
    0.25 up to p = 0.2, 0.5 above (WikiText-2 validation, both embedded models, README
    "The criterion exponent at every budget")."""
    return 0.25 if budget <= 0.2 else 0.5


class CaptureConfig(Strict):
    batch_size: Count = 8


class SpeedConfig(Strict):
    """Dense vs pruned speed and memory in one process (cfsp.evaluation.speed)."""

    enabled: bool = False
    batch: Count = 1
    seqlen: Count = 128
    decode_tokens: Count = 16
    warmup: int = Field(1, ge=0, le=MAX_COUNT)
    repeats: Count = 5
    dtypes: list[Literal["float32", "bfloat16", "float16"]] = ["float32", "bfloat16"]
    seed: Seed = 0

    @model_validator(mode="after")
    def _bounded(self) -> SpeedConfig:
        check_tokens(self.batch, self.seqlen, "speed.batch x speed.seqlen")
        return self


class EvalConfig(Strict):
    perplexity: list[str] = ["botchan:test"]  # embedded; wikitext2/c4 need hub or CFSP_DATA_DIR
    # The causal-LM loss predicts token t+1 from t: a window of 1 token has nothing to score.
    seqlen: int = Field(128, ge=2, le=MAX_COUNT)
    limit: int | None = Field(64, gt=0, le=MAX_COUNT)
    batch_tokens: int = Field(4096, gt=0, le=MAX_TOKENS)
    tasks: list[str] = []  # zero-shot through lm-eval: piqa, arc_easy, boolq, winogrande, ...
    task_limit: int | None = Field(200, gt=0, le=MAX_COUNT)
    speed: SpeedConfig = SpeedConfig()  # measured against `reference` (the dense model)

    @model_validator(mode="after")
    def _bounded(self) -> EvalConfig:
        check_tokens(self.limit, self.seqlen, "limit x seqlen")
        return self


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecoverConfig(Strict):
    """Optional LoRA recovery after reconstruction (cfsp.recover); `rank` is the mean rank."""

    enabled: bool = False
    mode: Literal["ig", "uniform"] = "ig"  # ig: rank per block from coarse importance
    source: str = "c4"  # training text; keep it disjoint from the evaluation text
    nsamples: Count = 256
    rank: int = Field(8, ge=1, le=MAX_COUNT)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    lr: float = Field(2e-4, gt=0)
    steps: int = Field(100, ge=1, le=MAX_COUNT)
    seqlen: int = Field(128, ge=2, le=MAX_COUNT)
    batch: int = Field(4, ge=1, le=MAX_COUNT)
    seed: Seed = 0

    @model_validator(mode="after")
    def _bounded(self) -> RecoverConfig:
        check_tokens(self.nsamples, self.seqlen, "recover.nsamples x recover.seqlen")
        return self


class TrackingConfig(Strict):
    experiment: str = "cfsp"
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db

    def resolved_uri(self, output: str) -> str:
        """MLFLOW_TRACKING_URI wins; then this config; then sqlite in the output directory."""
        import os
        from pathlib import Path

        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return self.uri or f"sqlite:///{Path(output).absolute() / 'mlflow.db'}"


class ExportConfig(Strict):
    """Which checkpoints a run writes (cfsp.export): compact (per-block widths, the speed-up),
    padded (stock-loadable everywhere, same outputs, no speed-up), uniform (stock-loadable;
    needs allocation=uniform). Kinds other than compact go beside the run's checkpoint."""

    kinds: list[Literal["compact", "padded", "uniform"]] = Field(
        default_factory=lambda: ["compact"], min_length=1
    )

    @model_validator(mode="after")
    def _once(self) -> ExportConfig:
        repeated = sorted({k for k in self.kinds if self.kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"kinds: {', '.join(repeated)} listed twice")
        return self


class RunnerConfig(Strict):
    """Where the sweep's tasks run: threads here, or a Dask cluster (pip install cfsp[dask])."""

    kind: Literal["threads", "dask"] = "threads"
    workers: int = Field(2, gt=0)
    address: str | None = None  # dask: scheduler address; None starts a local cluster


class Params(Strict):
    """params.yaml: what to compress (models x budgets x methods) and one section per stage."""

    models: list[str] = Field(default_factory=lambda: ["smollm2-135m"], min_length=1)
    budgets: list[float] = Field(default_factory=lambda: [0.3], min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["cfsp"], min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", pattern=DEVICE_PATTERN)  # cfsp.devices: auto, cpu, cuda[:N]
    output: str = "out"
    prepare: CalibConfig = CalibConfig()
    capture: CaptureConfig = CaptureConfig()
    allocate: AllocateConfig = AllocateConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    recover: RecoverConfig = RecoverConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _check_grid(self) -> Params:
        for key in ("models", "budgets", "methods"):
            values = getattr(self, key)
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{key}: {', '.join(repeated)} listed twice (one run each)")
        for budget in self.budgets:
            if not 0.0 <= budget < 1.0:
                raise ValueError(f"budgets: {budget} is not in [0, 1)")
        for method in self.methods:
            try:
                cfg = prune_config(self, method, self.budgets[0] if self.budgets else 0.0)
            except (ValidationError, ValueError) as err:
                detail = explain(err, PruneConfig) if isinstance(err, ValidationError) else str(err)
                raise ValueError(f"methods: {method!r}: {detail}") from None
            if "uniform" in self.export.kinds and cfg.allocation != "uniform":
                raise ValueError(
                    f"export.kinds: uniform needs allocation=uniform, and method {method!r} "
                    f"allocates {cfg.allocation} (per-block widths); export padded instead"
                )
        return self


# Keys a method variant may not set: each run's budget and preset come from the grid.
GRID_KEYS = {"budget": "budgets", "method": "methods"}


def parse_variant(variant: str) -> tuple[str, dict]:
    """`PRESET[+key=value...]` -> (preset, overrides), e.g. `flap+reconstruct=liar` or
    `cfsp+structures=ffn+heads` (a '+' starts a new override only before `key=`)."""
    import re

    method, *items = re.split(r"\+(?=[a-z_]+=)", variant)
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in GRID_KEYS:
            raise ValueError(
                f"method variant {variant!r}: {key!r} is set by the grid "
                f"({GRID_KEYS[key]} in params.yaml), not by a variant"
            )
        if key in overrides:
            raise ValueError(f"method variant {variant!r}: {key!r} is given twice")
        overrides[key] = int(value) if key == "round_to" and value.isdigit() else value
    if "+" in method or "=" in method:
        raise ValueError(f"method variant {variant!r}: expected PRESET[+key=value...]")
    return method, overrides


def prune_config(params: Params, variant: str, budget: float) -> PruneConfig:
    """The full pruning config for one (method variant, budget) of a params file."""
    method, overrides = parse_variant(variant)
    values = {**params.allocate.model_dump(), **params.reconstruct.model_dump()}
    values.update(method=method, budget=budget, **overrides)
    return PruneConfig(**values)


def load_params(path) -> Params:
    """Read and validate params.yaml before any work starts."""
    from pathlib import Path

    from cfsp.io import check_regular_file

    path = check_regular_file(Path(path), "params file")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a mapping of sections")
    return validate(Params, raw, str(path))


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error: the plain
    loader keeps the last value silently (`budgets:` twice runs only the second grid)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str):
    """Parse YAML with `UniqueKeyLoader`; any problem is one UsageError naming line and column."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{where} is not valid YAML{at}: {problem}") from err


def validate(model_cls: type[Strict], values: dict, where: str = "parameters") -> Strict:
    """Build a config, turning pydantic's report into one readable UsageError."""
    try:
        return model_cls(**values)
    except ValidationError as err:
        raise UsageError(f"invalid {where}: {explain(err, model_cls)}") from None


def explain(err: ValidationError, model_cls: type[BaseModel]) -> str:
    """pydantic's report as one line: `key: problem; ...`, naming the allowed keys."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(str(e["loc"][-1]), model_cls, e["loc"])
        problems.append(f"{loc}: {msg}" if loc else msg)  # a whole-model check names its key
    return "; ".join(problems)


def _suggest(key: str, model_cls: type[BaseModel], loc: tuple) -> str:
    """Name the allowed keys of the section that rejected `key` (and the closest one)."""
    import difflib

    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            cls = field.annotation
    allowed = list(cls.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" (allowed: {', '.join(allowed)}){hint}"
