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
from cfsp.capture import Statistics
from cfsp.config import PruneConfig
from cfsp.errors import UsageError
from cfsp.importance import block_scores
from cfsp.prune import BlockPlan, apply_plan, select, update_config
from cfsp.reconstruct import fold, relative_error

log = logging.getLogger(__name__)


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


def plan_blocks(
    model, stats: Statistics, cfg: PruneConfig
) -> tuple[list[BlockPlan], list[float], Geometry]:
    """Choose what every block keeps. Returns (plans, keep ratios, geometry)."""
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
    return plans, ratios, geo


def _check_counts(geo: Geometry, counts: list[BlockCounts], budget: float, round_to: int) -> None:
    achieved = achieved_fraction(geo, counts)
    slack = 0.01 + (round_to * geo.ffn_params(1) / geo.block_params() if round_to > 1 else 0)
    if budget > 0 and abs(achieved - budget) > slack:
        raise UsageError(
            f"budget {budget} cannot be met: the allocation reaches {achieved:.4f} "
            "(blocks at their minimum width); choose a smaller budget"
        )


def enable_biases(model, adapter: DecoderAdapter) -> None:
    """Give o_proj and down_proj a bias, the way the stock config can express it."""
    config = model.config
    stock_flags = adapter.o_bias_attr is not None and adapter.mlp_bias_attr is not None
    for block in adapter.layers(model):
        p = adapter.parts(block)
        targets = [p.o, p.down] + ([p.q, p.k, p.v, p.gate, p.up] if stock_flags else [])
        for layer in targets:
            if layer.bias is None:
                layer.bias = torch.nn.Parameter(
                    torch.zeros(layer.out_features, dtype=layer.weight.dtype)
                )
    if stock_flags:
        setattr(config, adapter.o_bias_attr, True)
        setattr(config, adapter.mlp_bias_attr, True)
    else:
        config.cfsp_extra_bias = ["o_proj", "down_proj"]


@torch.no_grad()
def prune_model(model, stats: Statistics, cfg: PruneConfig) -> PruneReport:
    """Prune (and reconstruct) `model` in place; return what was done."""
    adapter = adapter_for(model)
    t0 = time.perf_counter()
    before = geometry(model, adapter)
    plans, ratios, geo = plan_blocks(model, stats, cfg)
    t_plan = time.perf_counter()
    if cfg.reconstruct != "none":
        enable_biases(model, adapter)
    errors = []
    for index, (block, plan) in enumerate(zip(adapter.layers(model), plans, strict=True)):
        tb = time.perf_counter()
        p = adapter.parts(block)
        o_keep = torch.tensor(
            [h * geo.head_dim + j for h in plan.heads for j in range(geo.head_dim)]
        )
        d_keep = torch.tensor(plan.channels)
        folded = {}
        row = {"block": index}
        for name, layer, st, keep in (
            ("o", p.o, stats.blocks[index].o, o_keep),
            ("down", p.down, stats.blocks[index].down, d_keep),
        ):
            w_new, b_new = fold(layer.weight, layer.bias, st, keep, cfg.reconstruct, cfg.damping)
            zero_b = torch.zeros_like(b_new) if layer.bias is None else layer.bias.double()
            row[f"{name}_before"] = relative_error(
                layer.weight, layer.bias, st, keep, layer.weight.double()[:, keep], zero_b
            )
            row[f"{name}_after"] = relative_error(layer.weight, layer.bias, st, keep, w_new, b_new)
            folded[name] = (w_new, b_new)
        apply_plan(adapter, block, plan, geo.head_dim)
        p = adapter.parts(block)
        for name, layer in (("o", p.o), ("down", p.down)):
            w_new, b_new = folded[name]
            layer.weight.copy_(w_new.to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(b_new.to(layer.bias.dtype))
        errors.append(row)
        w = plan.widths()
        log.info(
            "prune block %2d: keep %.3f heads %d/%d kv %d/%d ffn %4d/%d  err o %.4f->%.4f "
            "down %.4f->%.4f  %.2fs",
            index,
            ratios[index],
            w.num_heads,
            before.num_heads,
            w.num_kv_heads,
            before.num_kv_heads,
            w.intermediate,
            before.intermediate,
            row["o_before"],
            row["o_after"],
            row["down_before"],
            row["down_after"],
            time.perf_counter() - tb,
        )
    update_config(model.config, [p.widths() for p in plans], geo.head_dim)
    params_before = before.block_params() * before.num_blocks
    params_after = sum(
        geo.attn_params(len(p.heads), len(p.kv_heads)) + geo.ffn_params(len(p.channels))
        for p in plans
    )
    t_end = time.perf_counter()
    return PruneReport(
        config=cfg.model_dump(),
        keep_ratios=ratios,
        plans=plans,
        block_params_before=params_before,
        block_params_after=params_after,
        achieved_fraction=1.0 - params_after / params_before,
        errors=errors,
        timings={"plan": round(t_plan - t0, 3), "prune_reconstruct": round(t_end - t_plan, 3)},
    )
