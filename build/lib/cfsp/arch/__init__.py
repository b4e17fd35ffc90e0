"""Architecture adapters, one flat file per family. Add a family: write its file, register it
below, and add its tiny config to tests/conftest.py so the contract suite runs against it."""

from __future__ import annotations

from cfsp.arch.base import BlockParts, BlockWidths, DecoderAdapter
from cfsp.arch.gemma3 import Gemma3Adapter
from cfsp.arch.llama import LlamaAdapter
from cfsp.arch.mistral import MistralAdapter
from cfsp.arch.phi3 import Phi3Adapter
from cfsp.arch.qwen2 import Qwen2Adapter
from cfsp.arch.qwen3 import Qwen3Adapter
from cfsp.errors import UsageError

ADAPTERS: tuple[type[DecoderAdapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    Phi3Adapter,
    Gemma3Adapter,
)
SUPPORTED = sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config) -> DecoderAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter()
    raise UsageError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)} "
        "(see README, 'Adding an architecture')"
    )


__all__ = ["ADAPTERS", "SUPPORTED", "BlockParts", "BlockWidths", "DecoderAdapter", "adapter_for"]
