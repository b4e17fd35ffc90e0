"""Error-aware selection: remove the inputs whose loss the least-squares refit repairs best.

Objective (the one LIAR's refit minimises, so selection and reconstruction share it). For a
module y = W x + b, W [d, n], input covariance C [n, n] (the bias absorbs the mean), removing
the inputs P and refitting the kept S by least squares leaves the output error
    E(P) = tr(W_P (C_PP - C_PS C_SS^-1 C_SP) W_P^T) = tr(W_P (K_PP)^-1 W_P^T),  K = C^-1,
the Schur complement of C_SS, written with the inverse Gram (block inverse identity). C is
damped as the reconstruction damps it: C + lambda I, lambda = damping * mean(diag C) (LIAR takes
the mean over the kept diagonal; the two differ by the removed channels' share, a few percent).

Greedy removal with the inverse update (OBS; as in ZipLM / SlimGPT, written here from the
formulas). State: the kept set R, K = (C_RR)^-1 and W' = the refit weights on R (W' = W at the
start). Removing a unit g (one channel, or a head's hd channels) from R raises the error by
    dE(g) = tr(W'_g (K_gg)^-1 W'_g^T)                (one channel: ||W'_:,j||^2 / K_jj)
and the refit and inverse follow in closed form:
    W' <- W' - W'_g (K_gg)^-1 K_g,:        K <- K - K_:,g (K_gg)^-1 K_g,:
(the rows/columns of g become zero and are masked from then on). Each step removes the unit of
least dE, so E(P) is the sum of the steps' dE exactly (tracked in `ErrorState.error`).

Chunks: FFN channels are removed `chunk` at a time (the chunk of least single-channel dE, then
one block update): chunk 1 is the exact greedy; a larger chunk ignores the interactions inside
the chunk when ranking (never when updating or counting the error) and cuts the steps to
|P| / chunk. Heads under GQA (cfsp.engine.slicing: query heads are kept group by group, a KV
group goes with all its query heads): first every group is cut to the allocated r heads (one
head per step, over all groups that still have more than r), then whole groups (their r heads
together) are removed down to the allocated number of KV groups.

Shapes and cost: W [d, n], C [n, n], float64. One Cholesky inverse O(n^3), then per step
O(c r n + d n c) for a unit of c channels after r removed (`ErrorState` keeps K as a low-rank
downdate of the first inverse): O(n^3 + |P|^2 n + d n |P|) per module, once per block.
"""

from __future__ import annotations

import math

import torch

from cfsp.engine.plan import BlockCounts, BlockPlan
from cfsp.engine.reconstruct import damped_cholesky
from cfsp.engine.statistics import ChannelStats

MAX_STEPS = 32  # FFN removal steps per module at most (chunk = ceil(|P| / MAX_STEPS))


def damped_inverse(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """(C + lambda I)^-1, lambda = damping * mean(diag C), tenfold more until it factors."""
    return torch.cholesky_inverse(damped_cholesky(cov, damping))


class ErrorState:
    """Kept set, its inverse covariance K and refit weights W'; removes units by the update.

    K is held as K0 - B B^T (K0 the first inverse, B [n, r] one column per removed channel:
    the update's K_:,g L^-T with K_gg = L L^T), so a step reads only the rows it removes and
    the diagonal: O(c r n + d n c) for c channels after r, not O(n^2 c)."""

    def __init__(self, weight: torch.Tensor, cov: torch.Tensor, damping: float):
        n = cov.shape[0]
        self.w = weight.detach().to(torch.float64).clone()  # W' [d, n]
        self.k0 = damped_inverse(cov.to(torch.float64), damping)  # K0 [n, n]
        self.diag = self.k0.diagonal().clone()  # diag(K) [n]
        self.b = torch.zeros(n, n, dtype=torch.float64, device=cov.device)  # B [n, <= n]
        self.rank = 0
        self.alive = torch.ones(n, dtype=torch.bool, device=cov.device)
        self.error = 0.0

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of the current K [c, n]."""
        b = self.b[:, : self.rank]
        return self.k0[idx] - b[idx] @ b.T

    def channel_costs(self) -> torch.Tensor:
        """dE of removing each single channel [n]; inf for channels already removed."""
        cost = self.w.square().sum(0) / self.diag.clamp_min(1e-300)
        return cost.masked_fill(~self.alive, math.inf)

    def unit_costs(self, units: torch.Tensor) -> torch.Tensor:
        """dE of removing each unit [u] (rows of `units` [u, c] are channel indices)."""
        u, c = units.shape
        flat = units.reshape(-1)
        sub = self.rows(flat)[:, flat].view(u, c, u, c)
        k_gg = sub[torch.arange(u), :, torch.arange(u), :]  # [u, c, c]
        w_g = self.w[:, flat].view(-1, u, c).permute(1, 0, 2)  # [u, d, c]
        solved = torch.linalg.solve(k_gg, w_g.transpose(1, 2))  # [u, c, d] = K_gg^-1 W'_g^T
        return (w_g.transpose(1, 2) * solved).sum((1, 2))

    def remove(self, idx: torch.Tensor) -> float:
        """Remove channels `idx` together; return (and add to `error`) the error they add."""
        rows = self.rows(idx)  # K_g,: [c, n]
        chol = torch.linalg.cholesky(rows[:, idx])  # K_gg = L L^T
        w_g = self.w[:, idx]
        half = torch.linalg.solve_triangular(chol, w_g.T, upper=False)  # L^-1 W'_g^T
        added = float(half.square().sum())
        self.w -= w_g @ torch.cholesky_solve(rows, chol)  # W'_g K_gg^-1 K_g,:
        new = torch.linalg.solve_triangular(chol, rows, upper=False).T  # K_:,g L^-T [n, c]
        self.b[:, self.rank : self.rank + len(idx)] = new
        self.rank += len(idx)
        self.diag -= new.square().sum(1)
        self.w[:, idx] = 0
        self.alive[idx] = False
        self.error += added
        return added


def select_channels(
    weight: torch.Tensor, stats: ChannelStats, keep: int, damping: float, chunk: int | None = None
) -> tuple[list[int], float]:
    """Kept channel indices (sorted) of the greedy removal down to `keep`, and E(P).

    weight: W [d, n] of the module reading the channels (down_proj); stats: their moments.
    `chunk` channels per step (default ceil(|P| / MAX_STEPS); 1 = exact greedy)."""
    n = weight.shape[1]
    remove = n - keep
    state = ErrorState(weight, stats.cov, damping)
    step = chunk or max(1, math.ceil(remove / MAX_STEPS))
    while remove > 0:
        c = min(step, remove)
        state.remove(state.channel_costs().topk(c, largest=False).indices)
        remove -= c
    return state.alive.nonzero().squeeze(1).tolist(), state.error


def select_heads(
    weight: torch.Tensor,
    stats: ChannelStats,
    counts: BlockCounts,
    num_kv_heads: int,
    head_dim: int,
    damping: float,
) -> tuple[list[int], list[int], float]:
    """(kept query heads, kept KV groups, E(P)) for o_proj: W [d, H*hd], GQA-consistent.

    Phase 1 cuts every group to `counts.heads_per_group` heads, phase 2 removes whole groups
    down to `counts.kv_heads` (module docstring). Heads are numbered as in the dense model."""
    num_heads = weight.shape[1] // head_dim
    group = num_heads // num_kv_heads
    device = weight.device
    state = ErrorState(weight, stats.cov, damping)
    heads = torch.arange(num_heads * head_dim, device=device).view(num_heads, head_dim)
    alive = torch.ones(num_heads, dtype=torch.bool)
    for _ in range(num_kv_heads * (group - counts.heads_per_group)):
        per_group = alive.view(num_kv_heads, group).sum(1)
        allowed = alive.view(num_kv_heads, group) & (per_group > counts.heads_per_group)[:, None]
        candidates = allowed.view(-1).nonzero().squeeze(1)
        best = candidates[int(state.unit_costs(heads[candidates.to(device)]).argmin())]
        state.remove(heads[int(best)])
        alive[best] = False
    groups = list(range(num_kv_heads))
    by_group = heads.view(num_kv_heads, group, head_dim)
    for _ in range(num_kv_heads - counts.kv_heads):
        kept = [by_group[g][alive.view(num_kv_heads, group)[g].to(device)] for g in groups]
        units = torch.stack([k.reshape(-1) for k in kept])  # [groups left, r * hd]
        worst = groups[int(state.unit_costs(units).argmin())]
        state.remove(units[groups.index(worst)])
        alive.view(num_kv_heads, group)[worst] = False
        groups.remove(worst)
    return alive.nonzero().squeeze(1).tolist(), groups, state.error


def select_block(
    o_weight: torch.Tensor,
    down_weight: torch.Tensor,
    o_stats: ChannelStats,
    down_stats: ChannelStats,
    plan: BlockPlan,
    num_kv_heads: int,
    head_dim: int,
    damping: float,
) -> BlockPlan:
    """The kept set of a block by error-aware selection, with `plan`'s counts (the allocation's).

    A module whose count is its dense width is left whole (nothing to choose)."""
    counts = BlockCounts(
        len(plan.kv_heads), len(plan.heads) // max(1, len(plan.kv_heads)), len(plan.channels)
    )
    heads, kv_heads = plan.heads, plan.kv_heads
    if len(plan.heads) < o_weight.shape[1] // head_dim:
        heads, kv_heads, _ = select_heads(
            o_weight, o_stats, counts, num_kv_heads, head_dim, damping
        )
    channels = plan.channels
    if len(plan.channels) < down_weight.shape[1]:
        channels, _ = select_channels(down_weight, down_stats, len(plan.channels), damping)
    return BlockPlan(heads=heads, kv_heads=kv_heads, channels=channels)
