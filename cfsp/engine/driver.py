"""One prune of a loaded model from captured statistics, in place.

plan   fine scores per block (criterion) -> coarse counts per block (allocation) -> kept
       indices (`PrunePlan`), see importance.py, allocate.py, slicing.select (criterion
       `obs`: the kept set is chosen again when the block is pruned, from its Gram matrices,
       select_obs.py; the counts stay the allocation's);
prune  for each block: fold the pruned inputs of o_proj / down_proj into the kept ones
       (reconstruction, reconstruct.py), then slice (slicing.py). With sequential statistics
       each block's statistics are retaken on the outputs of the already-pruned blocks before
       it, by the one block loop (stream.py); with dense-target statistics each block is refit
       towards the dense model's residual stream (dense_target.py).
The model is resolved once (`Target`: adapter, blocks, dense geometry) and passed down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from cfsp.arch import DecoderAdapter
from cfsp.arch.base import head_rows
from cfsp.config import PruneConfig
from cfsp.data import TokenWindows
from cfsp.devices import math_dtype
from cfsp.engine.allocate import achieved_fraction, check_budget
from cfsp.engine.capture import peak_rss_mib
from cfsp.engine.dense_target import dense_targets, refit_block, target_stats
from cfsp.engine.importance import fine_scores
from cfsp.engine.plan import BlockCounts, BlockPlan, Geometry, PrunePlan
from cfsp.engine.reconstruct import fold, output_energy, relative_error
from cfsp.engine.registry import ALLOCATIONS, ERROR_SELECTED
from cfsp.engine.select_obs import select_block
from cfsp.engine.slicing import apply_plan, select, update_config
from cfsp.engine.statistics import BlockStats, Statistics
from cfsp.engine.stream import BlockStream, first_block_inputs, run_block
from cfsp.engine.target import Target, target_of
from cfsp.errors import UsageError

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
    compute: dict = field(default_factory=dict)  # device and math dtype of the statistics math
    choice: dict = field(default_factory=dict)  # control: auto's candidates and losses (choose)

    def to_dict(self) -> dict:
        extra = {"compute": self.compute} if self.compute else {}
        if self.choice:
            extra["control_choice"] = self.choice
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
            **extra,
        }


def plan_pruning(model_or_target, stats: Statistics, cfg: PruneConfig) -> PrunePlan:
    """Choose what every block keeps: fine scores, coarse counts, then kept indices."""
    target = target_of(model_or_target)
    geo = target.geometry
    check_budget(cfg.budget)
    if len(stats.blocks) != geo.num_blocks:
        raise UsageError(
            f"statistics cover {len(stats.blocks)} blocks, the model has {geo.num_blocks}"
        )
    return plan_from_scores(geo, stats.angular(), block_scores(target, stats, cfg), cfg)


def block_scores(target: Target, stats: Statistics, cfg: PruneConfig) -> list[tuple]:
    """Every block's (head, channel) fine scores by `cfg.criterion`."""
    return [
        fine_scores(
            cfg.criterion,
            target.adapter.parts(block),
            stats.blocks[i],
            target.geometry.head_dim,
            cfg.exponent,
            cfg.seed,
            i,
        )
        for i, block in enumerate(target.layers)
    ]


def plan_from_scores(
    geo: Geometry, angular: torch.Tensor, scores: list[tuple], cfg: PruneConfig
) -> PrunePlan:
    """Coarse counts and kept indices from every block's (head, channel) fine scores and the
    angular distances: `plan_pruning` after its scoring step, for callers that scored each block
    while its weights were at hand (the block-streamed engine)."""
    check_budget(cfg.budget)
    allocation = ALLOCATIONS[cfg.allocation]
    counts = allocation(geo, angular, [s[0] for s in scores], [s[1] for s in scores], cfg)
    _check_counts(geo, counts, cfg.budget, cfg.round_to)
    plans = [select(h, c, n, geo.num_kv_heads) for (h, c), n in zip(scores, counts, strict=True)]
    ratios = [n.params(geo) / geo.block_params() for n in counts]
    return PrunePlan(keep_ratios=ratios, blocks=plans)


def _check_counts(geo: Geometry, counts: list[BlockCounts], budget: float, round_to: int) -> None:
    achieved = achieved_fraction(geo, counts)
    slack = 0.01 + (round_to * geo.ffn_params(1) / geo.block_params() if round_to > 1 else 0)
    if budget > 0 and abs(achieved - budget) > slack:
        raise UsageError(
            f"budget {budget} cannot be met: the allocation reaches {achieved:.4f} "
            "(blocks at their minimum width); choose a smaller budget"
        )


def enable_biases(target: Target) -> dict[str, bool]:
    """Give every o_proj and down_proj a zero bias to fold compensation into; return which of
    them the stock config already builds with a bias (`settle_biases` needs it)."""
    adapter, config = target.adapter, target.model.config
    stock = {"o": adapter.has_bias(config, "o"), "mlp": adapter.has_bias(config, "mlp")}
    for block in target.layers:
        p = adapter.parts(block)
        _zero_bias(p.o)
        _zero_bias(p.down)
    return stock


def _zero_bias(layer) -> None:
    if layer.bias is None:
        w = layer.weight  # beside it; a meta skeleton (the streamed engine's) gets real zeros
        device = None if w.device.type == "meta" else w.device
        layer.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=device))


def settle_biases(target: Target, stock: dict[str, bool]) -> list[str]:
    """Keep a compensation bias only on the module kinds that received one, and record it.

    A bias that is zero in every block (e.g. o_proj when no head was pruned) is dropped: it
    would only cost an addmm. Uniform widths on an architecture with stock flags (LLaMA:
    attention_bias, mlp_bias) set the flag, which also builds q/k/v or gate/up biases, so those
    get explicit zeros and stock `from_pretrained` loads the result. Otherwise (per-block
    widths, or no such flags) `config.cfsp_extra_bias` names the kinds, read by `load_pruned`
    and the shipped modeling file, and no other module carries a bias. Returns the kinds.
    """
    adapter, config = target.adapter, target.model.config
    parts = [adapter.parts(b) for b in target.layers]
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
    measure: bool = True,
) -> dict:
    """Fold the pruned inputs of o_proj / down_proj (per `cfg.reconstruct`), then slice.

    With an error-selected criterion (`obs`) the kept set is chosen first, here where the
    block's Gram matrices are, and written into `plan` (`choose_kept`). Without `measure` the
    relative errors before / after of folded modules (three products with the Gram matrix
    each) are not computed: cfsp.engine.choose's trial prunes need only the weights."""
    choose_kept(adapter, block, plan, stats, cfg, head_dim)
    p = adapter.parts(block)
    row: dict = {}
    folded = {}
    for name, layer, st, keep in (
        ("o", p.o, stats.o, head_rows(plan.heads, head_dim)),
        ("down", p.down, stats.down, torch.tensor(plan.channels)),
    ):
        keep = keep.to(layer.weight.device)
        if keep.numel() == layer.in_features:  # nothing pruned: slicing alone, no error
            row[f"{name}_before"] = row[f"{name}_after"] = 0.0
            continue
        w_new, b_new = fold(layer.weight, layer.bias, st, keep, cfg.reconstruct, cfg.damping)
        folded[name] = (w_new, b_new)
        if not measure:
            continue
        plain_b = torch.zeros_like(b_new) if layer.bias is None else layer.bias.to(b_new.dtype)
        plain_w = layer.weight.to(w_new.dtype)[:, keep]
        total = output_energy(layer.weight, layer.bias, st)  # shared by both errors
        row[f"{name}_before"] = relative_error(
            layer.weight, layer.bias, st, keep, plain_w, plain_b, total
        )
        row[f"{name}_after"] = relative_error(
            layer.weight, layer.bias, st, keep, w_new, b_new, total
        )
    apply_plan(adapter, block, plan, head_dim)
    p = adapter.parts(block)
    for name, layer in (("o", p.o), ("down", p.down)):
        if name not in folded:
            continue
        w_new, b_new = folded[name]
        layer.weight.copy_(w_new.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(b_new.to(layer.bias.dtype))
    return row


def choose_kept(
    adapter: DecoderAdapter,
    block,
    plan: BlockPlan,
    stats: BlockStats,
    cfg: PruneConfig,
    head_dim: int,
) -> None:
    """For a criterion in `ERROR_SELECTED`, replace `plan`'s kept heads and channels (counts
    unchanged: the allocation's) by greedy error-aware removal on this block's statistics
    (cfsp.engine.select_obs), in place, so slicing, the report and both engines see the same
    set. Other criteria keep the top-score set chosen at planning time."""
    if cfg.criterion not in ERROR_SELECTED:
        return
    p = adapter.parts(block)
    kv_heads = p.k.weight.shape[0] // head_dim
    chosen = select_block(
        p.o.weight, p.down.weight, stats.o, stats.down, plan, kv_heads, head_dim, cfg.damping
    )
    plan.heads, plan.kv_heads, plan.channels = chosen.heads, chosen.kv_heads, chosen.channels


@torch.no_grad()
def prune_model(
    model_or_target,
    stats: Statistics,
    cfg: PruneConfig,
    windows: TokenWindows | None = None,
    plan: PrunePlan | None = None,
    batch_size: int = 8,
) -> PruneReport:
    """Prune (and reconstruct) the model in place; return what was done.

    `plan` defaults to `plan_pruning(...)`. `cfg.stats == "sequential"` recomputes each block's
    statistics on the outputs of the already-pruned blocks before it (a second pass over
    `windows`); "target" also walks the dense stream and refits each block towards it
    (cfsp.engine.dense_target); "dense" uses `stats`.
    """
    target = target_of(model_or_target)
    t0 = time.perf_counter()
    before = target.geometry
    choice = None
    if plan is None:
        from cfsp.engine.choose import choose_in_memory, chooses  # choose builds on this module

        heldout = windows.heldout if windows is not None else None
        if chooses(cfg, heldout):
            plan, choice = choose_in_memory(target, stats, cfg, heldout, batch_size)
        else:
            plan = plan_pruning(target, stats, cfg)
    if len(plan.blocks) != len(target.layers):
        raise UsageError(
            f"the plan covers {len(plan.blocks)} blocks, the model has {len(target.layers)}"
        )
    t_plan = time.perf_counter()
    stock_bias = enable_biases(target) if cfg.reconstruct != "none" else None
    errors = []
    for index, _block, prune in _block_pruners(target, stats, cfg, windows, batch_size):
        tb = time.perf_counter()
        block_plan = plan.blocks[index]
        row = {"block": index, **prune(block_plan)}
        errors.append(row)
        _log_block(
            index, plan.keep_ratios[index], block_plan, before, row, time.perf_counter() - tb
        )
    update_config(target.model.config, [p.widths() for p in plan.blocks], before.head_dim)
    if stock_bias is not None:
        settle_biases(target, stock_bias)
    timings = {"plan": t_plan - t0, "prune_reconstruct": time.perf_counter() - t_plan}
    report = prune_report(before, plan, cfg, errors, timings)
    report.choice = choice.to_dict() if choice is not None else {}
    device = next(target.model.parameters()).device
    report.compute = {"device": str(device), "math_dtype": str(math_dtype(device)).split(".")[-1]}
    return report


def prune_report(
    dense: Geometry, plan: PrunePlan, cfg: PruneConfig, errors: list[dict], timings: dict
) -> PruneReport:
    """What a prune did: block parameters before and after `plan`, per-block errors, timings."""
    params_before = dense.block_params() * dense.num_blocks
    params_after = sum(p.params(dense) for p in plan.blocks)
    return PruneReport(
        config=cfg.model_dump(),
        keep_ratios=plan.keep_ratios,
        plans=plan.blocks,
        block_params_before=params_before,
        block_params_after=params_after,
        achieved_fraction=1.0 - params_after / params_before,
        errors=errors,
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def _block_pruners(target: Target, stats: Statistics, cfg: PruneConfig, windows, batch_size):
    """(index, block, prune(plan) -> error row) for every block: `prune_block` on the block's
    statistics, or, with stats=target, the dense-target refit (`_dense_target_walk`)."""
    head_dim = target.geometry.head_dim
    if target_stats(cfg):
        yield from _dense_target_walk(target, cfg, windows, batch_size)
        return
    for index, block, block_stats in _blocks_with_stats(target, stats, cfg, windows, batch_size):

        def prune(plan: BlockPlan, block=block, block_stats=block_stats) -> dict:
            return prune_block(target.adapter, block, plan, block_stats, cfg, head_dim)

        yield index, block, prune


def _dense_target_walk(target: Target, cfg: PruneConfig, windows, batch_size):
    """Walk the dense stream and the pruned stream side by side (one model: each block is run
    dense for its targets h_mid / h_out before it is pruned), cfsp.engine.dense_target."""
    if windows is None:
        raise UsageError("dense-target statistics need the calibration windows")
    dense, kwargs = first_block_inputs(target, windows.ids, batch_size)
    pruned = list(dense)
    head_dim = target.geometry.head_dim
    for index, block in enumerate(target.layers):
        parts = target.adapter.parts(block)
        mids, outs = dense_targets(block, parts, dense, kwargs)

        def prune(plan: BlockPlan, block=block, mids=mids, outs=outs) -> dict:
            choose_on_stream(target.adapter, block, plan, cfg, head_dim, pruned, kwargs)
            stream = (pruned, kwargs)
            return refit_block(target.adapter, block, plan, cfg, head_dim, stream, mids, outs)

        yield index, block, prune


def choose_on_stream(adapter, block, plan: BlockPlan, cfg: PruneConfig, head_dim, hiddens, kw):
    """`choose_kept` from Grams taken on the pruned stream `hiddens` (stats=target), only for
    an error-selected criterion (the others keep the plan's set; no forward then)."""
    if cfg.criterion in ERROR_SELECTED:
        stats = run_block(block, adapter.parts(block), hiddens, kw, advance=False)
        choose_kept(adapter, block, plan, stats, cfg, head_dim)


def _blocks_with_stats(target: Target, stats: Statistics, cfg: PruneConfig, windows, batch_size):
    """(index, block, the statistics to reconstruct it from) for every block: the captured
    ones, or, for sequential statistics, ones retaken by the block loop, which then runs the
    calibration activations through each block after the caller pruned it."""
    if cfg.stats == "sequential" and cfg.reconstruct != "none":
        if windows is None:
            raise UsageError("sequential statistics need the calibration windows")
        stream = BlockStream(target, windows.ids, batch_size)
        yield from stream.walk(rewrites=True)
        return
    if len(stats.blocks) != len(target.layers):
        raise UsageError(
            f"statistics cover {len(stats.blocks)} blocks, the model has {len(target.layers)}"
        )
    for index, block in enumerate(target.layers):
        yield index, block, stats.blocks[index]


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
