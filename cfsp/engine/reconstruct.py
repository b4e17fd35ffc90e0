"""Retraining-free repair of a module whose input channels were pruned.

Module y = W x + b, W [n_out, n], inputs split into kept S and pruned P. From calibration
statistics (mean mu, covariance C of x):
  liar  fit x_P ~ Q x_S + p by damped least squares:
          Q = C_PS (C_SS + lambda I)^-1   [|P|, |S|],   p = mu_P - Q mu_S   [|P|]
          lambda = damping * mean(diag(C_SS))
        fold:  W_S' = W_S + W_P Q,   b' = b + W_P p
  bias  Q = 0:  W_S' = W_S,  b' = b + W_P mu_P        (FLAP's compensation)
  none  W_S' = W_S,  b' = b
Solved with Cholesky on the weight's device in `cfsp.devices.math_dtype` (float32 unless
CFSP_MATH_DTYPE=float64; the damping keeps the float32 system well conditioned: cond <= 1 + max
eig / lambda); if the damped matrix is still not positive definite the damping grows tenfold until
it is. The relative output error on calibration data,
  E = E_x ||(W x + b) - (W_S' x_S + b')||^2 / E_x ||W x + b||^2,
is computed from the same statistics (`relative_error`; exact up to 128 output rows, above on 128
evenly spaced rows: a report, and its full cost would exceed a 7B block's forward).
Each method is one function (W [n_out, n] and b [n_out] in the math dtype, `ChannelStats`, kept S,
pruned P) -> (W_S', b'), named in `cfsp.engine.registry.RECONSTRUCTIONS`.
"""

from __future__ import annotations

import torch

from cfsp.devices import math_dtype
from cfsp.engine.registry import RECONSTRUCTIONS
from cfsp.engine.statistics import ChannelStats, centered


def fold(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: ChannelStats,
    keep: torch.Tensor,
    method: str,
    damping: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (W_S' [n_out, |S|], b' [n_out]) on the weight's device in its math dtype, by the
    registered `method` (statistics and kept indices are moved there first)."""
    solve = RECONSTRUCTIONS[method]
    device = weight.device
    dtype = math_dtype(device)
    w = weight.detach().to(dtype)
    b = torch.zeros(w.shape[0], dtype=dtype, device=device) if bias is None else bias.to(dtype)
    stats = stats.to(device, dtype)
    keep = torch.as_tensor(keep, device=device)
    mask = torch.ones(w.shape[1], dtype=torch.bool, device=device)
    mask[keep] = False
    pruned = mask.nonzero().squeeze(1)
    if pruned.numel() == 0:
        return w[:, keep], b
    return solve(w, b, stats, keep, pruned, damping)


def no_fold(w, b, stats: ChannelStats, keep, pruned, damping: float):
    """W_S' = W_S, b' = b."""
    return w[:, keep], b


def bias_fold(w, b, stats: ChannelStats, keep, pruned, damping: float):
    """W_S' = W_S, b' = b + W_P mu_P."""
    return w[:, keep], b + w[:, pruned] @ stats.mean[pruned]


def liar_fold(w, b, stats: ChannelStats, keep, pruned, damping: float):
    """W_S' = W_S + W_P Q, b' = b + W_P p with Q, p the damped least-squares fit (above).

    The solve has |P| right-hand sides (Q^T), or n_out when that is fewer:
    (W_P Q)^T = (C_SS + lambda I)^-1 C_SP W_P^T and W_P p = W_P mu_P - (W_P Q) mu_S, the same
    fold for 2 |S|^2 min(|P|, n_out) flop."""
    if keep.numel() == 0:
        return bias_fold(w, b, stats, keep, pruned, damping)
    w_s, w_p = w[:, keep], w[:, pruned]
    mu = stats.mean
    kept_rows = centered(stats.gram[keep], stats.count, mu[keep], mu)  # C[S, :], no n^2 copy
    c_ss, c_sp = kept_rows[:, keep], kept_rows[:, pruned]
    del kept_rows
    if pruned.numel() > w.shape[0]:  # fewer outputs than pruned inputs: solve for W_P Q
        wq_t = _damped_solve(c_ss, c_sp @ w_p.T, damping)  # [|S|, n_out] = (W_P Q)^T
        return w_s + wq_t.T, b + w_p @ mu[pruned] - wq_t.T @ mu[keep]
    q_t = _damped_solve(c_ss, c_sp, damping)  # [|S|, |P|] = (C_SS + lambda I)^-1 C_SP
    q = q_t.T
    p = mu[pruned] - q @ mu[keep]
    return w_s + w_p @ q, b + w_p @ p


def damped_cholesky(a: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor of A + lambda I, lambda = damping * mean(diag A), tenfold more until
    it factors (one damping rule for the refit and for error-aware selection)."""
    scale = float(a.diagonal().mean().clamp_min(0))
    lam = damping * scale if scale > 0 else 1e-8
    shifted = a.clone()  # one n^2 copy; the damping goes on its diagonal in place
    shifted.diagonal().add_(lam)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return chol
        shifted.diagonal().add_(9 * lam)  # lambda -> 10 lambda
        lam *= 10
    raise RuntimeError("covariance is not positive definite even with heavy damping")


def _damped_solve(a: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.cholesky_solve(rhs, damped_cholesky(a, damping))


REPORT_ROWS = 128  # output rows the error report reads (all of them up to this many)


def report_rows(n_out: int, device) -> torch.Tensor | None:
    """The output rows the error report reads: None (all) up to REPORT_ROWS, else REPORT_ROWS
    evenly spaced ones. The report's quadratic forms cost rows x n^2; on all 4096 rows of a
    Llama-2-7B down_proj that was ~2e12 flop per block, more than the block's forward; on 128
    rows ~6e10, 2% of it."""
    if n_out <= REPORT_ROWS:
        return None
    return torch.linspace(0, n_out - 1, REPORT_ROWS, device=device).round().long().unique()


def relative_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: ChannelStats,
    keep: torch.Tensor,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor,
    total: float | None = None,
) -> float:
    """E_x ||y - y'||^2 / E_x ||y||^2 from the Gram matrix and mean (no activations needed).

    A report, not a solve: the quadratic forms run in float32, over the input channels where the
    weights changed only (the unfolded slice changes the pruned ones alone), and over the output
    rows of `report_rows` (exact up to 128 rows; above, the ratio on 128 evenly spaced rows).
    `total`: `output_energy` (same rows) when the caller has it.
    """
    rows = report_rows(weight.shape[0], weight.device)
    w, b = _float_rows(weight, bias, rows)
    device = w.device
    delta = w.clone()
    delta[:, torch.as_tensor(keep, device=device)] -= _rows(new_weight.to(device), rows).float()
    changed = (delta != 0).any(0).nonzero().squeeze(1)
    total = output_energy(weight, bias, stats) if total is None else total
    delta_b = b - _rows(new_bias.to(device).float(), rows)
    return _energy(delta[:, changed], delta_b, stats, changed) / max(total, 1e-30)


def output_energy(weight: torch.Tensor, bias: torch.Tensor | None, stats: ChannelStats) -> float:
    """E_x ||W x + b||^2 over `report_rows`, from the Gram matrix and mean (float32)."""
    w, b = _float_rows(weight, bias, report_rows(weight.shape[0], weight.device))
    return _energy(w, b, stats, None)


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _float_rows(weight, bias, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias (zeros when None) in float32, restricted to `rows`."""
    w = _rows(weight.detach(), rows).float()  # the rows first: no float copy of the whole
    b = torch.zeros(w.shape[0], device=w.device) if bias is None else _rows(bias.detach(), rows)
    return w, b.float()


def _energy(m: torch.Tensor, c: torch.Tensor, stats: ChannelStats, cols) -> float:
    """E_x ||m x_cols + c||^2 (all input channels when `cols` is None)."""
    gram, mu = stats.gram.to(m.device), stats.mean.to(m.device)
    if cols is not None and cols.numel() < gram.shape[0]:
        gram, mu = gram[cols][:, cols], mu[cols]
    quad = ((m @ gram.float()) * m).sum() / stats.count  # tr(m E[x x^T] m^T), no n^2 copy
    return float(quad + 2 * c @ (m @ mu.float()) + c @ c)
