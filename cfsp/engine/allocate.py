"""Coarse allocation: how many heads and FFN channels each block keeps, from a budget p.

Budget p = fraction of decoder-block weight parameters removed (q, k, v, o, gate, up, down;
embeddings, norms and the LM head are not counted). Block cost with h query heads, g KV heads
and m channels: 2*d*hd*h (q, o) + 2*d*hd*g (k, v) + 3*d*m (gate, up, down).

Keep ratios per block (for `uniform` and `cfsp`):
  uniform  keep_l = 1 - p
  cfsp     z_l = (abar_l - mean(abar)) / (T * std(abar))          (abar: mean angular distance)
           s_l = sigmoid(a * z_l);  keep_l = (1 - p) * s_l / mean(s)   (mean keep = 1 - p)
           if max keep >= 1: s_l <- mean(s) + gamma (s_l - mean(s)),
              gamma = mean(s) * (1/(1-p) - 1) / (max(s) - mean(s)) / 1.05
           then keep_l >= floor, mean preserved.  Standardising by std(abar) (our choice, not
           the paper's) makes T dimensionless and independent of the token count. a = 0 is
           the uniform allocation; `control: auto` chooses a per run (cfsp.engine.choose).
A block's ratio becomes counts: the feasible GQA head layout (g groups x r heads each) whose
attention cost is nearest keep_l * attention cost, then FFN channels filling the rest of
keep_l * block cost (rounded to a multiple if asked).
  flap     FLAP's adaptive structure: each block's head and channel scores standardised per block
           and module, one global threshold over all units by cost until 1 - p of the
           parameters are kept; heads snapped to a GQA layout, then channels re-thresholded
           globally to land on the budget.
Each allocation is one function (geometry, angular distances [L], head scores [[H]] and
channel scores [[m]] per block, config) -> `BlockCounts` per block, named in
`cfsp.engine.registry.ALLOCATIONS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cfsp.engine.plan import BlockCounts, Geometry
from cfsp.errors import UsageError

if TYPE_CHECKING:
    from cfsp.config import PruneConfig


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
        raise UsageError(f"budget must be a number in [0, 1), got {budget!r}")
    if not 0.0 <= budget < 1.0:
        raise UsageError(
            f"budget must be in [0, 1) (fraction of block parameters removed), got {budget}"
        )
    return float(budget)


def coarse_scores(angular: torch.Tensor, temperature: float = 1.0, control: float = 0.5):
    """Coarse importance s_l = sigmoid(a * z_l), z_l = standardised angular distance / T."""
    a = angular.double()
    spread = a.std() if a.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    z = (a - a.mean()) / (temperature * spread) if spread > 0 else torch.zeros_like(a)
    return torch.sigmoid(control * z)


def cfsp_keep_ratios(
    angular: torch.Tensor,
    budget: float,
    temperature: float = 1.0,
    control: float = 0.5,
    floor: float = 0.05,
) -> torch.Tensor:
    """Per-block keep ratios from mean angular distances (ALGORITHMS 1.2, standardised)."""
    keep_mean = 1.0 - budget
    if budget == 0.0:
        return torch.ones_like(angular, dtype=torch.float64)
    s = coarse_scores(angular, temperature, control)
    if (keep_mean * s / s.mean()).max() >= 1.0:
        mean = s.mean()
        gamma = mean * (1 / keep_mean - 1) / (s.max() - mean) / 1.05
        s = mean + gamma * (s - mean)
    keep = keep_mean * s / s.mean()
    return _floor_preserving_mean(keep, floor, keep_mean)


def _floor_preserving_mean(keep: torch.Tensor, floor: float, mean: float) -> torch.Tensor:
    """Raise ratios below `floor` and take the excess from the others, keeping the mean."""
    keep = keep.clone()
    if mean < floor:
        raise UsageError(
            f"budget {1 - mean:.3f} would keep less than the floor {floor} per block; "
            f"the largest budget is {1 - floor:.3f}"
        )
    for _ in range(100):
        low = keep < floor
        if not low.any():
            break
        keep[low] = floor
        free = ~low
        excess = keep.mean() - mean
        keep[free] -= excess * keep.numel() / free.sum()
    return keep.clamp(max=1.0)


def feasible_heads(geo: Geometry, target_attn: float) -> tuple[int, int]:
    """The (kv_heads, heads_per_group) whose attention cost is nearest `target_attn`."""
    best = None
    for g in range(1, geo.num_kv_heads + 1):
        for r in range(1, geo.group_size + 1):
            err = abs(geo.attn_params(g * r, g) - target_attn)
            key = (err, -g * r)
            if best is None or key < best[0]:
                best = (key, (g, r))
    return best[1]


def rounded_widths(multiple: int, dense: int) -> list[int]:
    """The FFN widths a rounding multiple allows: multiples of it, and the dense width."""
    return sorted({min(dense, multiple * k) for k in range(1, dense // multiple + 2)})


def round_channels(channels: float, multiple: int, dense: int) -> int:
    """The allowed width nearest `channels` (the dense width counts as allowed, so 90 of 96
    channels at multiple 64 becomes 96, not 64)."""
    if multiple <= 1:
        return int(round(channels))
    return min(rounded_widths(multiple, dense), key=lambda w: (abs(w - channels), w))


def counts_from_ratios(
    geo: Geometry, keep: torch.Tensor, prune_heads: bool, multiple: int = 1, min_channels: int = 1
) -> list[BlockCounts]:
    counts = []
    for k in keep.tolist():
        if prune_heads:
            g, r = feasible_heads(geo, k * geo.attn_params(geo.num_heads, geo.num_kv_heads))
        else:
            g, r = geo.num_kv_heads, geo.group_size
        rest = k * geo.block_params() - geo.attn_params(g * r, g)
        m = min(geo.intermediate, max(min_channels, rest / geo.ffn_params(1)))
        counts.append(BlockCounts(g, r, round_channels(m, multiple, geo.intermediate)))
    check_rounding(geo, counts, 1.0 - float(keep.mean()), multiple, prune_heads)
    return counts


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else torch.tensor(1.0, dtype=x.dtype)
    return (x - x.mean()) / (std if std > 0 else 1.0)


def flap_counts(
    geo: Geometry,
    head_scores: list[torch.Tensor],
    channel_scores: list[torch.Tensor],
    budget: float,
    prune_heads: bool,
    multiple: int = 1,
) -> list[BlockCounts]:
    """FLAP's global standardised threshold over all heads and channels of all blocks."""
    target = (1.0 - budget) * geo.block_params() * geo.num_blocks
    head_cost = geo.attn_params(1, 0) + geo.attn_params(0, 1) / geo.group_size
    layouts = []
    if prune_heads:
        z_heads = [_standardise(s) for s in head_scores]
        z_chan = [_standardise(s) for s in channel_scores]
        units = [(float(z), head_cost, b, "h") for b, zs in enumerate(z_heads) for z in zs]
        units += [(float(z), geo.ffn_params(1), b, "c") for b, zs in enumerate(z_chan) for z in zs]
        units.sort(key=lambda u: -u[0])
        kept_heads = [0] * geo.num_blocks
        spent = 0.0
        for _z, cost, b, kind in units:
            if spent >= target:
                break
            spent += cost
            if kind == "h":
                kept_heads[b] += 1
        for b in range(geo.num_blocks):
            share = max(1, kept_heads[b]) * head_cost
            layouts.append(feasible_heads(geo, share))
    else:
        layouts = [(geo.num_kv_heads, geo.group_size)] * geo.num_blocks
    attn_total = sum(geo.attn_params(g * r, g) for g, r in layouts)
    ffn_budget = target - attn_total
    z_chan = [_standardise(s) for s in channel_scores]
    # Every block keeps at least one channel; the rest go to the globally best z-scores.
    channels = [1] * geo.num_blocks
    pool = [
        (float(z), b) for b, zs in enumerate(z_chan) for z in zs.sort(descending=True).values[1:]
    ]
    order = sorted(pool, key=lambda u: -u[0])
    available = int(ffn_budget // geo.ffn_params(1)) - geo.num_blocks
    for _z, b in order[: max(0, available)]:
        channels[b] += 1
    counts = [
        BlockCounts(g, r, round_channels(m, multiple, geo.intermediate))
        for (g, r), m in zip(layouts, channels, strict=True)
    ]
    check_rounding(geo, counts, budget, multiple, prune_heads)
    return counts


def check_rounding(
    geo: Geometry, counts: list[BlockCounts], budget: float, multiple: int, prune_heads: bool
) -> None:
    """Refuse an allocation whose rounded widths land far from the budget.

    Rounding a block's FFN width to the nearest allowed width moves its cost by at most half
    the largest gap between allowed widths; an allocation further than that (plus 1%) from the
    budget means the multiple cannot express the budget: `round_to 128` on a 128-wide FFN
    keeps every channel, and would otherwise be reported as "removed 0.00%" with success.
    """
    if multiple <= 1 or budget <= 0:
        return
    achieved = achieved_fraction(geo, counts)
    widths = rounded_widths(multiple, geo.intermediate)
    gap = max((b - a for a, b in zip(widths, widths[1:], strict=False)), default=0)
    if abs(achieved - budget) <= 0.01 + geo.ffn_params(gap) / 2 / geo.block_params():
        return
    raise UsageError(
        f"budget {budget:g} cannot be met with round_to {multiple}: FFN widths of "
        f"{geo.intermediate} channels rounded to multiples of {multiple} remove "
        f"{achieved:.4f} of block parameters; {rounding_reach(geo, multiple, prune_heads)}; "
        "choose a budget near one of those or a smaller round_to"
    )


def rounding_reach(geo: Geometry, multiple: int, prune_heads: bool) -> str:
    """What budgets a rounding multiple can reach: the largest, and those of uniform widths."""
    widths = rounded_widths(multiple, geo.intermediate)
    whole = (geo.num_kv_heads, geo.group_size)
    uniform = [achieved_fraction(geo, [BlockCounts(*whole, w)] * geo.num_blocks) for w in widths]
    low = (1, 1) if prune_heads else whole
    most = achieved_fraction(geo, [BlockCounts(*low, widths[0])] * geo.num_blocks)
    shown = ", ".join(f"{f:.3f}" for f in sorted(uniform)[:8])
    more = ", ..." if len(uniform) > 8 else ""
    return f"it reaches budgets up to {most:.3f} (equal widths in every block: {shown}{more})"


def achieved_fraction(geo: Geometry, counts: list[BlockCounts]) -> float:
    kept = sum(c.params(geo) for c in counts)
    return 1.0 - kept / (geo.block_params() * geo.num_blocks)


# What `control: auto` means where no choice is made (cfsp.engine.choose.chooses is false).
DEFAULT_CONTROL = 0.5


def cfsp_allocation(
    geo: Geometry, angular: torch.Tensor, head_scores, channel_scores, cfg: PruneConfig
) -> list[BlockCounts]:
    control = DEFAULT_CONTROL if cfg.control == "auto" else cfg.control
    keep = cfsp_keep_ratios(angular, cfg.budget, cfg.temperature, control, cfg.floor)
    return counts_from_ratios(geo, keep, cfg.structures == "ffn+heads", cfg.round_to)


def uniform_allocation(
    geo: Geometry, angular: torch.Tensor, head_scores, channel_scores, cfg: PruneConfig
) -> list[BlockCounts]:
    keep = torch.full((geo.num_blocks,), 1.0 - cfg.budget, dtype=torch.float64)
    return counts_from_ratios(geo, keep, cfg.structures == "ffn+heads", cfg.round_to)


def flap_allocation(
    geo: Geometry, angular: torch.Tensor, head_scores, channel_scores, cfg: PruneConfig
) -> list[BlockCounts]:
    prune_heads = cfg.structures == "ffn+heads"
    return flap_counts(geo, head_scores, channel_scores, cfg.budget, prune_heads, cfg.round_to)
