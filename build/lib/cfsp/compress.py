"""Coarse-to-fine pruning of a loaded model from captured statistics (in place).

scores (fine, per block) -> counts (coarse allocation) -> kept indices -> for each block:
fold the pruned inputs of o_proj / down_proj into the kept ones (reconstruct), then slice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from cfsp.allocate import (
    BlockCounts,
    Geometry,
    achieved_fraction,
    cfsp_keep_ratios,
    check_budget,
    counts_from_ratios,
    flap_counts,
)
from cfsp.arch import DecoderAdapter, adapter_for
from cfsp.arch.base import head_rows
from cfsp.capture import (
    BlockStats,
    Statistics,
    block_forward,
    first_block_inputs,
    peak_rss_mib,
    run_block,
)
from cfsp.config import PruneConfig
from cfsp.data import TokenWindows
from cfsp.errors import UsageError
from cfsp.importance import block_scores
from cfsp.prune import BlockPlan, apply_plan, select, update_config
from cfsp.reconstruct import fold, relative_error

log = logging.getLogger(__name__)


@dataclass
class Allocation:
    """Per-block keep ratios (of block parameters) and kept indices: the `allocate` artifact."""

    keep_ratios: list[float]
    blocks: list[BlockPlan]

    def to_dict(self) -> dict:
        return {"keep_ratios": self.keep_ratios, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> Allocation:
        return cls(data["keep_ratios"], [BlockPlan(**b) for b in data["blocks"]])


@dataclass
class PruneReport:
    config: dict
    keep_ratios: list[float]
    plans: list[BlockPlan]
    block_params_before: int
    block_params_after: int
    achieved_fraction: float
    errors: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "budget_counts": "fraction of decoder-block weight parameters (q,k,v,o,gate,up,down)",
            "achieved_fraction": self.achieved_fraction,
            "block_params_before": self.block_params_before,
            "block_params_after": self.block_params_after,
            "keep_ratios": self.keep_ratios,
            "widths": [p.widths().to_dict() for p in self.plans],
            "kept": [p.to_dict() for p in self.plans],
            "reconstruction_error": self.errors,
            "timings_s": self.timings,
        }


def geometry(model, adapter: DecoderAdapter) -> Geometry:
    widths = adapter.block_widths(model)
    if len(set(widths)) != 1:
        raise UsageError("the model is already pruned to per-block widths; prune the dense model")
    w = widths[0]
    return Geometry(
        hidden=model.config.hidden_size,
        head_dim=adapter.head_dim(model.config),
        num_heads=w.num_heads,
        num_kv_heads=w.num_kv_heads,
        intermediate=w.intermediate,
        num_blocks=len(widths),
    )


def allocate(model, stats: Statistics, cfg: PruneConfig) -> Allocation:
    """Choose what every block keeps: coarse counts, then fine indices."""
    adapter = adapter_for(model)
    geo = geometry(model, adapter)
    check_budget(cfg.budget)
    if len(stats.blocks) != geo.num_blocks:
        raise UsageError(
            f"statistics cover {len(stats.blocks)} blocks, the model has {geo.num_blocks}"
        )
    scores = [
        block_scores(
            cfg.criterion,
            adapter.parts(block),
            stats.blocks[i],
            geo.head_dim,
            cfg.exponent,
            cfg.seed,
            i,
        )
        for i, block in enumerate(adapter.layers(model))
    ]
    prune_heads = cfg.structures == "ffn+heads"
    if cfg.allocation == "flap":
        counts = flap_counts(
            geo,
            [s[0] for s in scores],
            [s[1] for s in scores],
            cfg.budget,
            prune_heads,
            cfg.round_to,
        )
    else:
        if cfg.allocation == "uniform":
            keep = torch.full((geo.num_blocks,), 1.0 - cfg.budget, dtype=torch.float64)
        else:
            keep = cfsp_keep_ratios(
                stats.angular(), cfg.budget, cfg.temperature, cfg.control, cfg.floor
            )
        counts = counts_from_ratios(geo, keep, prune_heads, cfg.round_to)
    _check_counts(geo, counts, cfg.budget, cfg.round_to)
    plans = [select(h, c, n, geo.num_kv_heads) for (h, c), n in zip(scores, counts, strict=True)]
    ratios = [n.params(geo) / geo.block_params() for n in counts]
    return Allocation(keep_ratios=ratios, blocks=plans)


def _check_counts(geo: Geometry, counts: list[BlockCounts], budget: float, round_to: int) -> None:
    achieved = achieved_fraction(geo, counts)
    slack = 0.01 + (round_to * geo.ffn_params(1) / geo.block_params() if round_to > 1 else 0)
    if budget > 0 and abs(achieved - budget) > slack:
        raise UsageError(
            f"budget {budget} cannot be met: the allocation reaches {achieved:.4f} "
            "(blocks at their minimum width); choose a smaller budget"
        )


def enable_biases(model, adapter: DecoderAdapter) -> dict[str, bool]:
    """Give every o_proj and down_proj a zero bias to fold compensation into; return which of
    them the stock config already builds with a bias (`settle_biases` needs it)."""
    stock = {"o": adapter.has_bias(model.config, "o"), "mlp": adapter.has_bias(model.config, "mlp")}
    for block in adapter.layers(model):
        p = adapter.parts(block)
        _zero_bias(p.o)
        _zero_bias(p.down)
    return stock


def _zero_bias(layer) -> None:
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype))


def settle_biases(model, adapter: DecoderAdapter, stock: dict[str, bool]) -> list[str]:
    """Keep a compensation bias only on the module kinds that received one, and record it.

    A bias that is zero in every block (e.g. o_proj when no head was pruned) is dropped: it
    would only cost an addmm. Uniform widths on an architecture with stock flags (LLaMA:
    attention_bias, mlp_bias) set the flag, which also builds q/k/v or gate/up biases, so those
    get explicit zeros and stock `from_pretrained` loads the result. Otherwise (per-block
    widths, or no such flags) `config.cfsp_extra_bias` names the kinds, read by `load_pruned`
    and the shipped modeling file, and no other module carries a bias. Returns the kinds.
    """
    config, parts = model.config, [adapter.parts(b) for b in adapter.layers(model)]
    kinds = {"o": "o_proj", "mlp": "down_proj"}
    layers = {"o": [p.o for p in parts], "mlp": [p.down for p in parts]}
    needed = [
        role
        for role in kinds
        if not stock[role] and any(bool(layer.bias.abs().sum() > 0) for layer in layers[role])
    ]
    for role in kinds:
        if not stock[role] and role not in needed:
            for layer in layers[role]:
                layer.bias = None
    if not needed:
        return []
    flags = {"o": adapter.o_bias_attr, "mlp": adapter.mlp_bias_attr}
    if getattr(config, "cfsp_layer_widths", None) or not all(flags[r] for r in needed):
        config.cfsp_extra_bias = [kinds[r] for r in needed]
        return config.cfsp_extra_bias
    for role in needed:
        setattr(config, flags[role], True)
        for p in parts:
            for rows in (p.q, p.k, p.v) if role == "o" else (p.gate, p.up):
                _zero_bias(rows.linear)  # a fused module gets one bias over all its roles
    return [kinds[r] for r in needed]


def prune_block(
    adapter: DecoderAdapter,
    block,
    plan: BlockPlan,
    stats: BlockStats,
    cfg: PruneConfig,
    head_dim: int,
) -> dict:
    """Fold the pruned inputs of o_proj / down_proj (per `cfg.reconstruct`), then slice."""
    p = adapter.parts(block)
    row: dict = {}
    folded = {}
    for name, layer, st, keep in (
        ("o", p.o, stats.o, head_rows(plan.heads, head_dim)),
        ("down", p.down, stats.down, torch.tensor(plan.channels)),
    ):
        w_new, b_new = fold(layer.weight, layer.bias, st, keep, cfg.reconstruct, cfg.damping)
        plain_b = torch.zeros_like(b_new) if layer.bias is None else layer.bias.double()
        row[f"{name}_before"] = relative_error(
            layer.weight, layer.bias, st, keep, layer.weight.double()[:, keep], plain_b
        )
        row[f"{name}_after"] = relative_error(layer.weight, layer.bias, st, keep, w_new, b_new)
        folded[name] = (w_new, b_new)
    apply_plan(adapter, block, plan, head_dim)
    p = adapter.parts(block)
    for name, layer in (("o", p.o), ("down", p.down)):
        w_new, b_new = folded[name]
        layer.weight.copy_(w_new.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(b_new.to(layer.bias.dtype))
    return row


@torch.no_grad()
def prune_model(
    model,
    stats: Statistics,
    cfg: PruneConfig,
    windows: TokenWindows | None = None,
    allocation: Allocation | None = None,
    batch_size: int = 8,
) -> PruneReport:
    """Prune (and reconstruct) `model` in place; return what was done.

    `cfg.stats == "sequential"` recomputes each block's statistics on the outputs of the
    already-pruned blocks before it (a second pass over `windows`); "dense" uses `stats`.
    """
    adapter = adapter_for(model)
    t0 = time.perf_counter()
    before = geometry(model, adapter)
    allocation = allocation or allocate(model, stats, cfg)
    t_plan = time.perf_counter()
    stock_bias = enable_biases(model, adapter) if cfg.reconstruct != "none" else None
    stream = None
    if cfg.stats == "sequential" and cfg.reconstruct != "none":
        if windows is None:
            raise UsageError("sequential statistics need the calibration windows")
        stream = first_block_inputs(model, windows.ids, batch_size)
    errors = []
    for index, (block, plan) in enumerate(
        zip(adapter.layers(model), allocation.blocks, strict=True)
    ):
        tb = time.perf_counter()
        block_stats = stats.blocks[index]
        if stream is not None:  # this block's inputs come from the pruned blocks before it
            block_stats = run_block(block, adapter.parts(block), *stream, advance=False)
        row = {
            "block": index,
            **prune_block(adapter, block, plan, block_stats, cfg, before.head_dim),
        }
        if stream is not None:
            hiddens, kwargs_list = stream
            for j, h in enumerate(hiddens):
                hiddens[j] = block_forward(block, h, kwargs_list[j])
        errors.append(row)
        _log_block(
            index, allocation.keep_ratios[index], plan, before, row, time.perf_counter() - tb
        )
    update_config(model.config, [p.widths() for p in allocation.blocks], before.head_dim)
    if stock_bias is not None:
        settle_biases(model, adapter, stock_bias)
    params_before = before.block_params() * before.num_blocks
    params_after = sum(
        before.attn_params(len(p.heads), len(p.kv_heads)) + before.ffn_params(len(p.channels))
        for p in allocation.blocks
    )
    t_end = time.perf_counter()
    return PruneReport(
        config=cfg.model_dump(),
        keep_ratios=allocation.keep_ratios,
        plans=allocation.blocks,
        block_params_before=params_before,
        block_params_after=params_after,
        achieved_fraction=1.0 - params_after / params_before,
        errors=errors,
        timings={"plan": round(t_plan - t0, 3), "prune_reconstruct": round(t_end - t_plan, 3)},
    )


def _log_block(
    index: int, keep: float, plan: BlockPlan, dense: Geometry, row: dict, seconds: float
) -> None:
    w = plan.widths()
    log.info(
        "prune block %2d: keep %.3f heads %d/%d kv %d/%d ffn %4d/%d  rel.err o %.4f->%.4f "
        "down %.4f->%.4f  %.2fs  peak rss %.0f MiB",
        index,
        keep,
        w.num_heads,
        dense.num_heads,
        w.num_kv_heads,
        dense.num_kv_heads,
        w.intermediate,
        dense.intermediate,
        row["o_before"],
        row["o_after"],
        row["down_before"],
        row["down_after"],
        seconds,
        peak_rss_mib(),
    )
