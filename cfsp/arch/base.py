"""The adapter contract: where a LLaMA-style decoder keeps each role, and how to resize it.

A decoder block is h' = h + o(attn(q, k, v)(norm1(h))); h'' = h' + down(act(gate(x)) * up(x)),
x = norm2(h'). Pruning removes
  * FFN channels: rows of gate and up, the matching input columns of down;
  * attention heads: head_dim rows of q per query head, head_dim input columns of o, and, when a
    whole KV group goes, head_dim rows of k and v.
GQA: query head i uses KV head i // (n_heads / n_kv). Stock attention repeats each KV head
n_heads / n_kv times, so every kept group keeps the SAME number of query heads in a block.

Subclasses (one flat file per family) state the module types they accept and which
projections carry biases in the stock modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class BlockParts:
    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass(frozen=True)
class BlockWidths:
    """What a block keeps: query heads, KV heads and FFN channels."""

    num_heads: int
    num_kv_heads: int
    intermediate: int

    def to_dict(self) -> dict[str, int]:
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate,
        }


class DecoderAdapter:
    """Roles of a LLaMA-style decoder-only model (model.model.layers[i].self_attn / .mlp)."""

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    # Which projections carry a bias in the stock modeling code, as a function of the config.
    qkv_bias_attr: ClassVar[str | None] = None
    o_bias_attr: ClassVar[str | None] = None
    mlp_bias_attr: ClassVar[str | None] = None
    qkv_bias_always: ClassVar[bool] = False

    # -- locating modules -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def embed(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).embed_tokens

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.self_attn, block.mlp
        return BlockParts(
            attn=attn,
            q=attn.q_proj,
            k=attn.k_proj,
            v=attn.v_proj,
            o=attn.o_proj,
            mlp=mlp,
            gate=mlp.gate_proj,
            up=mlp.up_proj,
            down=mlp.down_proj,
        )

    # -- geometry ---------------------------------------------------------------------------
    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def block_widths(self, model: nn.Module) -> list[BlockWidths]:
        """Read the widths from the modules themselves (they differ per block once pruned)."""
        hd = self.head_dim(model.config)
        widths = []
        for block in self.layers(model):
            p = self.parts(block)
            widths.append(
                BlockWidths(
                    num_heads=p.q.out_features // hd,
                    num_kv_heads=p.k.out_features // hd,
                    intermediate=p.gate.out_features,
                )
            )
        return widths

    def set_attention_heads(self, attn: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attributes the stock attention forward reads after its heads changed."""
        attn.num_key_value_groups = num_heads // num_kv_heads
        for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)

    def set_intermediate(self, mlp: nn.Module, intermediate: int) -> None:
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate

    # -- biases -----------------------------------------------------------------------------
    def has_bias(self, config, role: str) -> bool:
        """Whether the stock module for `role` ('qkv', 'o', 'mlp') is built with a bias."""
        if role == "qkv" and self.qkv_bias_always:
            return True
        attr = {"qkv": self.qkv_bias_attr, "o": self.o_bias_attr, "mlp": self.mlp_bias_attr}[role]
        return bool(attr and getattr(config, attr, False))
