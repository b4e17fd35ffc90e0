"""The engine's named choices: criteria, allocations and reconstructions, name -> function.

Each registry is the single list of what a config may name: `PruneConfig` derives its allowed
values from it, the method presets are checked against it, and the CLI help is built from it.
A line names the function as `module:function` and says in a few words what it does; the
function is imported on first use, so reading the names (config validation, `--help`) does
not import torch. Adding a choice: write the function in its module, add its line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cfsp.errors import UsageError


@dataclass(frozen=True)
class Choice:
    target: str  # "package.module:function"
    description: str


@dataclass
class Registry:
    """An ordered name -> (function, one-line description) mapping for one kind of choice."""

    kind: str  # what a choice is called in messages: "criterion", "allocation", ...
    choices: dict[str, Choice]
    _loaded: dict[str, Callable] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> Callable:
        """The function registered as `name` (imported on first use)."""
        if name not in self.choices:
            raise UsageError(f"unknown {self.kind} {name!r}; choose one of {self.listing()}")
        if name not in self._loaded:
            module, _, attr = self.choices[name].target.partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self.choices

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def names(self) -> tuple[str, ...]:
        return tuple(self.choices)

    def listing(self) -> str:
        """`a, b, c`: for messages and help strings."""
        return ", ".join(self.choices)

    def described(self) -> str:
        """`a (what a does); b (...)`: for help strings."""
        return "; ".join(f"{name} ({c.description})" for name, c in self.choices.items())


_FINE = "cfsp.engine.importance"
CRITERIA = Registry(
    "criterion",
    {
        "cfsp": Choice(f"{_FINE}:cfsp_score", "activation norm^c x relative weight importance"),
        "act_norm": Choice(f"{_FINE}:act_norm_score", "activation L2 norm"),
        "wanda_sp": Choice(f"{_FINE}:wanda_sp_score", "mean |weight| x activation norm"),
        "flap": Choice(f"{_FINE}:flap_score", "activation variance x squared weight norm, WIFV"),
        "magnitude": Choice(f"{_FINE}:magnitude_score", "weight column L2 norm"),
        "random": Choice(f"{_FINE}:random_score", "seeded uniform random"),
        "obs": Choice(
            f"{_FINE}:obs_score", "greedy removal, least error left after the LIAR refit, OBS"
        ),
    },
)
# Criteria whose kept set is chosen from the Gram matrices when each block is pruned
# (cfsp.engine.select_obs), not as the top scores: their score only feeds the allocation.
ERROR_SELECTED = frozenset({"obs"})

_COARSE = "cfsp.engine.allocate"
ALLOCATIONS = Registry(
    "allocation",
    {
        "cfsp": Choice(f"{_COARSE}:cfsp_allocation", "per block from angular distance"),
        "uniform": Choice(f"{_COARSE}:uniform_allocation", "the same ratio in every block"),
        "flap": Choice(f"{_COARSE}:flap_allocation", "one global threshold on standardised scores"),
    },
)

_FOLD = "cfsp.engine.reconstruct"
RECONSTRUCTIONS = Registry(
    "reconstruction",
    {
        "liar": Choice(f"{_FOLD}:liar_fold", "least-squares fold of pruned inputs into kept"),
        "bias": Choice(f"{_FOLD}:bias_fold", "mean of pruned inputs into the bias, FLAP"),
        "none": Choice(f"{_FOLD}:no_fold", "plain slicing"),
    },
)


# Method presets: an allocation, a criterion and a reconstruction by name; a config's
# `allocation` / `criterion` / `reconstruct` override its preset's.
PRESETS: dict[str, dict[str, str]] = {
    "cfsp": {"allocation": "cfsp", "criterion": "cfsp", "reconstruct": "liar"},
    "flap": {"allocation": "flap", "criterion": "flap", "reconstruct": "bias"},
    "wanda_sp": {"allocation": "uniform", "criterion": "wanda_sp", "reconstruct": "none"},
    "act_norm": {"allocation": "cfsp", "criterion": "act_norm", "reconstruct": "liar"},
    "magnitude": {"allocation": "uniform", "criterion": "magnitude", "reconstruct": "none"},
    "random": {"allocation": "uniform", "criterion": "random", "reconstruct": "none"},
}
PRESET_KEYS = {"allocation": ALLOCATIONS, "criterion": CRITERIA, "reconstruct": RECONSTRUCTIONS}


def check_presets() -> None:
    """Every preset names a registered allocation, criterion and reconstruction (and only
    those three keys): checked when this module is imported."""
    for method, preset in PRESETS.items():
        if set(preset) != set(PRESET_KEYS):
            raise ValueError(f"preset {method!r} must set exactly {', '.join(PRESET_KEYS)}")
        for key, registry in PRESET_KEYS.items():
            if preset[key] not in registry:
                raise ValueError(
                    f"preset {method!r}: {key} {preset[key]!r} is not registered "
                    f"({registry.listing()})"
                )


check_presets()
