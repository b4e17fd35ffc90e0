"""The adapter contract: where a LLaMA-style decoder keeps each role, and how to resize it.

A decoder block is h' = h + o(attn(q, k, v)(norm1(h))); h'' = h' + down(act(gate(x)) * up(x)),
x = norm2(h'). Pruning removes
  * FFN channels: rows of gate and up, the matching input columns of down;
  * attention heads: head_dim rows of q per query head, head_dim input columns of o, and, when a
    whole KV group goes, head_dim rows of k and v.
GQA: query head i uses KV head i // (n_heads / n_kv). Stock attention repeats each KV head
n_heads / n_kv times, so every kept group keeps the SAME number of query heads in a block.

Roles vs modules. q, k, v, gate and up are ROLES: each is a range of output rows of an
nn.Linear (`RoleRows`). Most families give each role its own projection; Phi-3 fuses them
(qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows). o and down are always separate
modules (their input columns are sliced, and capture hooks their inputs). Everything outside
`cfsp/arch` goes through the adapter's three operations:
  parts(block)                       the modules and role rows of a block (weights as views)
  slice_block(block, plan, head_dim) physically keep a plan's heads/channels, fused or not
  resize_block(block, widths, ...)   rebuild empty projections at given widths (for loading)
A family overrides `parts` when its roles live elsewhere; slicing and resizing follow from the
role rows, so a fused layout needs no slicing code of its own.

The rebuild-at-widths code and the module/config attributes a stock forward reads live in
`cfsp/modeling_cfsp.py`, which must run without cfsp (it is shipped inside checkpoints); the
adapter calls into it, so there is one implementation of each.

Subclasses (one flat file per family) state the module types they accept and which
projections carry biases in the stock modeling code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class RoleRows:
    """Output rows [start, stop) of `linear` that belong to one role (q, k, v, gate or up).

    weight [stop - start, in] and bias [stop - start] are views of the module's parameters:
    reading them costs no copy and in-place writes reach the module.
    """

    linear: nn.Linear
    start: int
    stop: int

    @classmethod
    def whole(cls, linear: nn.Linear) -> RoleRows:
        """A separate projection: the role is all of its rows."""
        return cls(linear, 0, linear.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.linear.bias
        return None if bias is None else bias[self.start : self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        return self.linear.in_features


@dataclass(frozen=True)
class BlockParts:
    attn: nn.Module
    q: RoleRows
    k: RoleRows
    v: RoleRows
    o: nn.Linear
    mlp: nn.Module
    gate: RoleRows
    up: RoleRows
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


class KeptIndices(Protocol):
    """What `slice_block` needs of a plan (cfsp.engine.plan.BlockPlan): sorted dense indices, query
    heads grouped by KV head."""

    heads: list[int]
    kv_heads: list[int]
    channels: list[int]


def head_rows(index: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of `index` heads of `head_dim` rows each: [len(index) * head_dim]."""
    rows = [i * head_dim + j for i in index for j in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


def slice_linear(
    layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new nn.Linear holding weight[rows][:, cols] (bias[rows]); same dtype and device."""
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    # skip_init: no random initialisation of a weight about to be overwritten (at the 7B shape
    # it was ~10% of the second pass)
    new = nn.utils.skip_init(
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def replace_child(owner: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `owner` holds `old` (found by identity, so any attribute name works)."""
    for name, child in owner.named_children():
        if child is old:
            setattr(owner, name, new)
            return
    raise ValueError(f"{type(owner).__name__} holds no such {type(old).__name__}")


class DecoderAdapter:
    """Roles of a LLaMA-style decoder-only model (model.model.layers[i].self_attn / .mlp)."""

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    # Which projections carry a bias in the stock modeling code, as a function of the config.
    qkv_bias_attr: ClassVar[str | None] = None
    o_bias_attr: ClassVar[str | None] = None
    mlp_bias_attr: ClassVar[str | None] = None
    qkv_bias_always: ClassVar[bool] = False
    # Projection names as configs spell them (LoRA targets q_proj ... down_proj) -> the module
    # of this family that holds that role, where it differs (fused families).
    fused_names: ClassVar[dict[str, str]] = {}

    # -- locating modules -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def embed(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).embed_tokens

    def parts(self, block: nn.Module) -> BlockParts:
        """Separate projections: every role is a whole module."""
        attn, mlp = block.self_attn, block.mlp
        return BlockParts(
            attn=attn,
            q=RoleRows.whole(attn.q_proj),
            k=RoleRows.whole(attn.k_proj),
            v=RoleRows.whole(attn.v_proj),
            o=attn.o_proj,
            mlp=mlp,
            gate=RoleRows.whole(mlp.gate_proj),
            up=RoleRows.whole(mlp.up_proj),
            down=mlp.down_proj,
        )

    def module_name(self, projection: str) -> str:
        """The module name that holds `projection` (e.g. Phi-3: q_proj -> qkv_proj)."""
        return self.fused_names.get(projection, projection)

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
        """Update what the stock attention forward reads after its heads changed (module
        attributes, and a per-block config view where the forward reads the config)."""
        from cfsp import modeling_cfsp  # imports transformers: only when a block is resized

        modeling_cfsp.set_attention_widths(attn, num_heads, num_kv_heads)

    def set_intermediate(self, mlp: nn.Module, intermediate: int) -> None:
        from cfsp import modeling_cfsp

        modeling_cfsp.set_mlp_width(mlp, intermediate)

    # -- resizing ---------------------------------------------------------------------------
    def slice_block(self, block: nn.Module, plan: KeptIndices, head_dim: int) -> None:
        """Keep `plan`'s heads and channels in place; weights and biases follow their rows.

        Each output projection gets the kept rows of every role it holds, in its own row order
        (start of the role + kept rows within the role): q -> kept query heads, k and v -> kept
        KV heads, gate and up -> kept channels. o and down keep the matching input columns.
        """
        p = self.parts(block)
        q_rows, kv_rows = head_rows(plan.heads, head_dim), head_rows(plan.kv_heads, head_dim)
        chans = torch.tensor(plan.channels, dtype=torch.long)
        kept = {"q": q_rows, "k": kv_rows, "v": kv_rows, "gate": chans, "up": chans}
        projections: dict[int, tuple[nn.Module, nn.Linear, list[tuple[int, torch.Tensor]]]] = {}
        for role, rows in kept.items():
            view: RoleRows = getattr(p, role)
            owner = p.attn if role in ("q", "k", "v") else p.mlp
            entry = projections.setdefault(id(view.linear), (owner, view.linear, []))
            entry[2].append((view.start, view.start + rows))
        for owner, linear, pieces in projections.values():
            rows = torch.cat([r for _, r in sorted(pieces, key=lambda piece: piece[0])])
            replace_child(owner, linear, slice_linear(linear, rows=rows))
        replace_child(p.attn, p.o, slice_linear(p.o, cols=q_rows))
        replace_child(p.mlp, p.down, slice_linear(p.down, cols=chans))
        self.set_attention_heads(p.attn, len(plan.heads), len(plan.kv_heads))
        self.set_intermediate(p.mlp, len(plan.channels))

    def resize_block(
        self,
        block: nn.Module,
        widths: BlockWidths,
        head_dim: int,
        extra_bias: Sequence[str] = (),
    ) -> None:
        """Replace the block's projections by uninitialised ones at `widths` (a checkpoint's
        weights are loaded into them next); `extra_bias` names projections that gain a bias."""
        from cfsp import modeling_cfsp

        p = self.parts(block)
        modeling_cfsp.resize_block(
            p.attn,
            p.mlp,
            widths.num_heads,
            widths.num_kv_heads,
            widths.intermediate,
            head_dim,
            extra_bias,
        )

    # -- biases -----------------------------------------------------------------------------
    def has_bias(self, config, role: str) -> bool:
        """Whether the stock module for `role` ('qkv', 'o', 'mlp') is built with a bias."""
        if role == "qkv" and self.qkv_bias_always:
            return True
        attr = {"qkv": self.qkv_bias_attr, "o": self.o_bias_attr, "mlp": self.mlp_bias_attr}[role]
        return bool(attr and getattr(config, attr, False))
