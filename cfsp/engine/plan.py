"""The plan types: what a dense model looks like, and what each of its blocks keeps.

Geometry    dense widths of every block (hidden d, head_dim hd, H heads, G KV heads, m channels)
            and the parameter cost of a block: 2*d*hd*(h + g) (q, k, v, o) + 3*d*m (gate, up,
            down). The budget counts these weights only (no embeddings, norms, LM head).
BlockCounts how many KV groups, query heads per group and FFN channels one block keeps
            (the coarse allocation's output).
BlockPlan   which ones: sorted indices in the dense numbering (the fine selection's output).
PrunePlan   every block's plan and keep ratio: the `allocate` stage's artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

from cfsp.arch import BlockWidths


@dataclass(frozen=True)
class Geometry:
    """Dense widths of a model's blocks (all blocks are equal before pruning)."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    num_blocks: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def attn_params(self, heads: int, kv_heads: int) -> int:
        return 2 * self.hidden * self.head_dim * (heads + kv_heads)

    def ffn_params(self, channels: int) -> int:
        return 3 * self.hidden * channels

    def block_params(self) -> int:
        return self.attn_params(self.num_heads, self.num_kv_heads) + self.ffn_params(
            self.intermediate
        )


@dataclass(frozen=True)
class BlockCounts:
    kv_heads: int
    heads_per_group: int
    channels: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    def params(self, geo: Geometry) -> int:
        return geo.attn_params(self.heads, self.kv_heads) + geo.ffn_params(self.channels)


@dataclass
class BlockPlan:
    """Kept indices of one block (sorted), in the dense model's numbering."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def widths(self) -> BlockWidths:
        return BlockWidths(len(self.heads), len(self.kv_heads), len(self.channels))

    def params(self, geo: Geometry) -> int:
        """Block weight parameters this plan keeps."""
        return geo.attn_params(len(self.heads), len(self.kv_heads)) + geo.ffn_params(
            len(self.channels)
        )

    def to_dict(self) -> dict:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "channels": self.channels}


@dataclass
class PrunePlan:
    """Per-block keep ratios (of block parameters) and kept indices: the `allocate` artifact."""

    keep_ratios: list[float]
    blocks: list[BlockPlan]

    def to_dict(self) -> dict:
        return {"keep_ratios": self.keep_ratios, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        return cls(data["keep_ratios"], [BlockPlan(**b) for b in data["blocks"]])
