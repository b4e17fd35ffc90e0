"""Physical removal: choose the kept heads and channels from scores and counts, slice weights.

For block l with kept query heads Hk (grouped by KV head), kept KV heads Gk, kept channels Mk:
  q.weight [H*hd, d]   -> rows of Hk           k/v.weight [G*hd, d] -> rows of Gk
  o.weight [d, H*hd]   -> columns of Hk        (biases follow their rows)
  gate/up.weight [m, d] -> rows of Mk          down.weight [d, m]   -> columns of Mk
Kept query heads are ordered group by group, so new query head i uses new KV head i // r, as
stock attention (repeat_kv) assumes. Where roles share a fused module (Phi-3 qkv_proj, gate_up_proj)
each role's rows are selected within its own row range (`DecoderAdapter.slice_block`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cfsp.allocate import BlockCounts
from cfsp.arch import BlockWidths, DecoderAdapter


@dataclass
class BlockPlan:
    """Kept indices of one block (sorted), in the dense model's numbering."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def widths(self) -> BlockWidths:
        return BlockWidths(len(self.heads), len(self.kv_heads), len(self.channels))

    def to_dict(self) -> dict:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "channels": self.channels}


def select(
    head_scores: torch.Tensor, channel_scores: torch.Tensor, counts: BlockCounts, num_kv_heads: int
) -> BlockPlan:
    """Top `counts` heads (GQA-consistent) and channels by score."""
    group_size = head_scores.numel() // num_kv_heads
    per_group = head_scores.view(num_kv_heads, group_size)
    r = counts.heads_per_group
    top_in_group = per_group.topk(r, dim=1)  # best r heads of every group
    group_value = top_in_group.values.sum(1)
    groups = sorted(group_value.topk(counts.kv_heads).indices.tolist())
    heads = [
        g * group_size + int(i) for g in groups for i in sorted(top_in_group.indices[g].tolist())
    ]
    channels = sorted(channel_scores.topk(counts.channels).indices.tolist())
    return BlockPlan(heads=heads, kv_heads=groups, channels=channels)


def apply_plan(adapter: DecoderAdapter, block: nn.Module, plan: BlockPlan, head_dim: int) -> None:
    """Slice one block in place to the kept heads and channels (fused projections included:
    the adapter knows which rows of which module each role is)."""
    adapter.slice_block(block, plan, head_dim)


def update_config(config, widths: list[BlockWidths], head_dim: int) -> None:
    """Uniform widths go into the standard fields; per-block widths into `cfsp_layer_widths`."""
    config.head_dim = head_dim  # hidden_size // num_attention_heads no longer holds
    if len(set(widths)) == 1:
        w = widths[0]
        config.num_attention_heads = w.num_heads
        config.num_key_value_heads = w.num_kv_heads
        config.intermediate_size = w.intermediate
        if hasattr(config, "cfsp_layer_widths"):
            del config.cfsp_layer_widths
    else:
        # Stock fields keep the dense widths (always a valid config); the real per-block
        # widths are read by cfsp.load_pruned or the checkpoint's modeling_cfsp.py.
        config.cfsp_layer_widths = [w.to_dict() for w in widths]
