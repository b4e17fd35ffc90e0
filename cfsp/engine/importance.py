"""Fine (intra-block) importance: one score per FFN channel and per attention head.

Notation: W_down [d, m], W_up / W_gate [m, d], W_o [d, H*hd], W_q [H*hd, d]; X_j is the
calibration activation entering input channel j of W_down (or W_o), from `ChannelStats`.
Per input channel j of W_down (FFN channel j) or of W_o (one of a head's hd channels):
  act_norm   ||X_j||_2
  wanda_sp   mean_i |W[i, j]| * ||X_j||_2
  flap       sigma_j^2 * ||W[:, j]||_2^2                        (WIFV)
  magnitude  ||W[:, j]||_2
  random     uniform(0, 1), seeded
  obs        sigma_j^2 * ||W[:, j]||_2^2: the output error of removing channel j alone when the
             inputs are uncorrelated. Only the allocation reads it: where the Gram matrix is at
             hand the kept set is chosen by error-aware greedy removal (cfsp.engine.select_obs).
  cfsp       ||X_j||^c * sum of relative importance of channel j's weights, where for a matrix A
             RI(A)_ik = |A_ik| / sum_k' |A_ik'| + |A_ik| / sum_i' |A_i'k|   (row AND column
             normalised), summed over the output-side weights (column j of W_down / W_o) and the
             input-side rows (row j of W_up and W_gate, or the head's rows of W_q).
             With column normalisation alone each term is constant and the score collapses to
             ||X_j||^c; the row term makes it depend on the weights.
A head's score is the sum of its hd channel scores.

Every criterion is one function here, named in `cfsp.engine.registry.CRITERIA`:
(W_out [d, n], producers [[n, d], ...], `ChannelStats` of the n inputs, exponent c, seeded
generator) -> scores [n], on the weights' device in its `cfsp.devices.math_dtype` (the
statistics are moved there first); `fine_scores` hands them back on the CPU in float64, where
the allocation runs. Higher means keep.
"""

from __future__ import annotations

import torch

from cfsp.arch import BlockParts
from cfsp.devices import math_dtype
from cfsp.engine.registry import CRITERIA
from cfsp.engine.statistics import BlockStats, ChannelStats


def _math(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(math_dtype(weight.device))


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """RI_ik = |A_ik| / row sum + |A_ik| / column sum, for A [out, in]."""
    a = weight.detach().abs().to(math_dtype(weight.device))
    return a / a.sum(1, keepdim=True).clamp_min(1e-12) + a / a.sum(0, keepdim=True).clamp_min(1e-12)


def relative_importance_sums(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """relative_importance(weight).sum(dim) without the [out, in] terms: with row sums r and
    column sums c of |A|, sum_i RI_ik = (|A|^T r^-1)_k + c_k / c_k and sum_k RI_ik =
    (|A| c^-1)_i + r_i / r_i (one |A| copy and a matrix-vector product instead of four
    matrix-sized temporaries; both clamp the sums at 1e-12 as relative_importance does)."""
    a = weight.detach().abs().to(math_dtype(weight.device))
    rows, cols = a.sum(1), a.sum(0)
    if dim == 0:
        return a.T @ rows.clamp_min(1e-12).reciprocal() + cols / cols.clamp_min(1e-12)
    return a @ cols.clamp_min(1e-12).reciprocal() + rows / rows.clamp_min(1e-12)


def cfsp_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    weight_term = relative_importance_sums(out_proj, 0)  # [n]
    for proj in in_projs:
        weight_term = weight_term + relative_importance_sums(proj, 1)
    return stats.norm.pow(exponent) * weight_term


def act_norm_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    return stats.norm


def wanda_sp_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    return _math(out_proj).abs().mean(0) * stats.norm


def flap_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    return stats.var * _math(out_proj).pow(2).sum(0)


def magnitude_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    return _math(out_proj).pow(2).sum(0).sqrt()


def obs_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    """The O(width) stand-in for the allocation; the kept set comes from `select_obs`."""
    return stats.var * out_proj.detach().double().pow(2).sum(0)


def random_score(out_proj, in_projs, stats: ChannelStats, exponent: float, gen) -> torch.Tensor:
    scores = torch.rand(out_proj.shape[1], generator=gen, dtype=torch.float64)  # CPU generator
    return scores.to(out_proj.device)


def fine_scores(
    criterion: str,
    parts: BlockParts,
    stats: BlockStats,
    head_dim: int,
    exponent: float = 0.5,
    seed: int = 0,
    block_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (head scores [H], FFN channel scores [m]) for one block, float64 on the CPU."""
    score = CRITERIA[criterion]
    gen = torch.Generator().manual_seed(seed * 100_003 + block_index)
    device = parts.down.weight.device
    dtype = math_dtype(device)
    down, o = stats.down.to(device, dtype), stats.o.to(device, dtype)
    channels = score(parts.down.weight, [parts.up.weight, parts.gate.weight], down, exponent, gen)
    # W_q rows of head h are the producers of W_o's input channels of head h.
    per_channel = score(parts.o.weight, [parts.q.weight], o, exponent, gen)
    heads = per_channel.view(-1, head_dim).sum(1)
    return heads.to("cpu", torch.float64), channels.to("cpu", torch.float64)
