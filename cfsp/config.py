"""Typed, validated parameters. Unknown keys are rejected; the applied config is saved with
every output. Method presets fill allocation / criterion / reconstruction unless overridden."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cfsp.errors import UsageError

PRESETS: dict[str, dict[str, str]] = {
    "cfsp": {"allocation": "cfsp", "criterion": "cfsp", "reconstruct": "liar"},
    "flap": {"allocation": "flap", "criterion": "flap", "reconstruct": "bias"},
    "wanda_sp": {"allocation": "uniform", "criterion": "wanda_sp", "reconstruct": "none"},
    "act_norm": {"allocation": "cfsp", "criterion": "act_norm", "reconstruct": "liar"},
    "magnitude": {"allocation": "uniform", "criterion": "magnitude", "reconstruct": "none"},
    "random": {"allocation": "uniform", "criterion": "random", "reconstruct": "none"},
}
Allocation = Literal["cfsp", "uniform", "flap"]
Criterion = Literal["cfsp", "act_norm", "wanda_sp", "flap", "magnitude", "random"]
Reconstruct = Literal["liar", "bias", "none"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibConfig(Strict):
    source: str = "botchan:train"  # embedded; disjoint from the default evaluation text
    nsamples: int = Field(128, gt=0)
    seqlen: int = Field(128, gt=0)
    seed: int = 0


class AllocateConfig(Strict):
    """Everything that decides what is kept (besides budget and method)."""

    # FFN-only is the default: on SmolLM2-135M it beat FFN+heads on WikiText-2 *validation*
    # text at p=0.2 and p=0.5 (README, "Measured"); ffn+heads stays one option away.
    structures: Literal["ffn+heads", "ffn"] = "ffn"
    temperature: float = Field(1.0, gt=0)
    control: float = Field(1.0, gt=0)
    floor: float = Field(0.05, gt=0, lt=1)
    exponent: float = Field(0.5, ge=0)
    round_to: Literal[1, 8, 64, 128] = 1
    seed: int = 0


class ReconstructConfig(Strict):
    damping: float = Field(0.01, gt=0)
    stats: Literal["dense", "sequential"] = "dense"


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
    allocation: Allocation | None = None
    criterion: Criterion | None = None
    reconstruct: Reconstruct | None = None

    @model_validator(mode="after")
    def _fill_preset(self) -> PruneConfig:
        if self.method not in PRESETS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.method]
        for key in ("allocation", "criterion", "reconstruct"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset[key])
        return self


class CaptureConfig(Strict):
    batch_size: int = Field(8, gt=0)


class SpeedConfig(Strict):
    """Dense vs pruned speed and memory in one process (cfsp.evaluate.speed)."""

    enabled: bool = False
    batch: int = Field(1, gt=0)
    seqlen: int = Field(128, gt=0)
    decode_tokens: int = Field(16, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, gt=0)
    dtypes: list[Literal["float32", "bfloat16", "float16"]] = ["float32", "bfloat16"]
    seed: int = 0


class EvalConfig(Strict):
    perplexity: list[str] = ["botchan:test"]  # embedded; wikitext2/c4 need hub or CFSP_DATA_DIR
    seqlen: int = Field(128, gt=0)
    limit: int | None = Field(64, gt=0)
    batch_tokens: int = Field(4096, gt=0)
    tasks: list[str] = []  # zero-shot through lm-eval: piqa, arc_easy, boolq, winogrande, ...
    task_limit: int | None = Field(200, gt=0)
    speed: SpeedConfig = SpeedConfig()  # measured against `reference` (the dense model)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecoverConfig(Strict):
    """Optional LoRA recovery after reconstruction (cfsp.recover); `rank` is the mean rank."""

    enabled: bool = False
    mode: Literal["ig", "uniform"] = "ig"  # ig: rank per block from coarse importance
    source: str = "c4"  # training text; keep it disjoint from the evaluation text
    nsamples: int = Field(256, gt=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    lr: float = Field(2e-4, gt=0)
    steps: int = Field(100, ge=1)
    seqlen: int = Field(128, ge=2)
    batch: int = Field(4, ge=1)
    seed: int = 0


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


class RunnerConfig(Strict):
    """Where the sweep's tasks run: threads here, or a Dask cluster (pip install cfsp[dask])."""

    kind: Literal["threads", "dask"] = "threads"
    workers: int = Field(2, gt=0)
    address: str | None = None  # dask: scheduler address; None starts a local cluster


class Params(Strict):
    """params.yaml: what to compress (models x budgets x methods) and one section per stage."""

    models: list[str] = ["smollm2-135m"]
    budgets: list[float] = [0.3]
    methods: list[str] = ["cfsp"]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: str = "out"
    prepare: CalibConfig = CalibConfig()
    capture: CaptureConfig = CaptureConfig()
    allocate: AllocateConfig = AllocateConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    recover: RecoverConfig = RecoverConfig()
    evaluate: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _check_grid(self) -> Params:
        for budget in self.budgets:
            if not 0.0 <= budget < 1.0:
                raise ValueError(f"budgets: {budget} is not in [0, 1)")
        for method in self.methods:
            try:
                prune_config(self, method, self.budgets[0] if self.budgets else 0.0)
            except (ValidationError, ValueError) as err:
                detail = explain(err, PruneConfig) if isinstance(err, ValidationError) else str(err)
                raise ValueError(f"methods: {method!r}: {detail}") from None
        return self


def parse_variant(variant: str) -> tuple[str, dict]:
    """`PRESET[+key=value...]` -> (preset, overrides), e.g. `flap+reconstruct=liar` or
    `cfsp+structures=ffn+heads` (a '+' starts a new override only before `key=`)."""
    import re

    method, *items = re.split(r"\+(?=[a-z_]+=)", variant)
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
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

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{path} is not valid YAML{where}: {problem}") from err
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a mapping of sections")
    return validate(Params, raw, str(path))


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
