"""The model being pruned, resolved once: its adapter, its blocks and its dense geometry.

Every engine step takes a `Target` instead of looking the adapter up again; build it with
`Target.of(model)` once per prune (the public API and the stages do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

from cfsp.arch import DecoderAdapter, adapter_for
from cfsp.engine.plan import Geometry
from cfsp.errors import UsageError


@dataclass
class Target:
    model: nn.Module
    adapter: DecoderAdapter
    layers: list[nn.Module] = field(repr=False)

    @classmethod
    def of(cls, model: nn.Module) -> Target:
        adapter = adapter_for(model)
        return cls(model, adapter, list(adapter.layers(model)))

    @cached_property
    def geometry(self) -> Geometry:
        """Dense widths; refuses a model whose blocks already differ (prune the dense one)."""
        widths = self.adapter.block_widths(self.model)
        if len(set(widths)) != 1:
            raise UsageError(
                "the model is already pruned to per-block widths; prune the dense model"
            )
        w = widths[0]
        return Geometry(
            hidden=self.model.config.hidden_size,
            head_dim=self.adapter.head_dim(self.model.config),
            num_heads=w.num_heads,
            num_kv_heads=w.num_kv_heads,
            intermediate=w.intermediate,
            num_blocks=len(widths),
        )


def target_of(model_or_target) -> Target:
    """A `Target` as given, or resolved from a model."""
    return model_or_target if isinstance(model_or_target, Target) else Target.of(model_or_target)
