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
    source: str = "botchan"
    nsamples: int = Field(128, gt=0)
    seqlen: int = Field(128, gt=0)
    seed: int = 0
    batch_size: int = Field(8, gt=0)


class PruneConfig(Strict):
    budget: float = Field(
        0.3, ge=0.0, lt=1.0, description="fraction of decoder-block weight parameters removed"
    )
    method: str = "cfsp"
    allocation: Allocation | None = None
    criterion: Criterion | None = None
    reconstruct: Reconstruct | None = None
    structures: Literal["ffn+heads", "ffn"] = "ffn+heads"
    temperature: float = Field(1.0, gt=0)
    control: float = Field(1.0, gt=0)
    floor: float = Field(0.05, gt=0, lt=1)
    exponent: float = Field(0.5, ge=0)
    round_to: Literal[1, 8, 64, 128] = 1
    damping: float = Field(0.01, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _fill_preset(self) -> PruneConfig:
        if self.method not in PRESETS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.method]
        for key in ("allocation", "criterion", "reconstruct"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, preset[key])
        return self


def validate(model_cls: type[Strict], values: dict, where: str = "parameters") -> Strict:
    """Build a config, turning pydantic's report into one readable UsageError."""
    try:
        return model_cls(**values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "value"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key (allowed: {', '.join(model_cls.model_fields)})"
            problems.append(f"{loc}: {msg}")
        raise UsageError(f"invalid {where}: " + "; ".join(problems)) from None
