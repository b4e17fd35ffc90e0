"""Dense-target reconstruction (`reconstruct.stats: target`): refit each pruned block so that
its output lands on the DENSE model's residual stream, given the PRUNED model's inputs.

`sequential` statistics fit each module to its own output on the pruned stream: the error an
earlier block passed on is carried along, never corrected. Here the dense walk keeps, per block,
the residual stream after attention h_mid and after the block h_out ([N, L, d]); the pruned walk
h~ then fits, for a module y = W x + b whose kept inputs are S,
  o_proj     y* = h_mid - h~_in        (what attention must add to reach the dense stream)
  down_proj  y* = h_out - h~_mid'      (h~_mid' = h~_in + the already-refit attention output)
  W' = W_S + C_{r,S} (C_SS + lambda I)^-1,   r = y* - (W_S x~_S + b),   b' = mu_y* - W' mu_S
with C the centred (co)variances over calibration tokens of the pruned inputs x~ and
lambda = damping * mean(diag C_SS) (`reconstruct.damped_cholesky`). Why this form: it is ridge
regression of y* on x~_S anchored at the sliced weights (penalty lambda ||W' - W_S||^2, not
||W'||^2), so when y* is the module's own output W x~ + b it is exactly the LIAR fold (C_{r,S} =
W_P C_PS); the damping shrinks towards the sliced weights, never towards zero. `bias` keeps
W' = W_S and sets b' = mu_y* - W_S mu_S. The statistics are the Gram of x~_S (|S|^2, taken after
slicing, freed after the module) and the cross-moment sum_t y*_t x~_t^T [d, |S|].

The targets are additive: they hold only if o_proj's and down_proj's outputs are added straight
to the residual stream (LLaMA, Qwen, Mistral, Phi-3). The dense walk checks h_out = h_in + y_o +
y_d on every block and refuses models that normalise those outputs first (Gemma 3).
A module with nothing pruned (o_proj when structures=ffn) is left as it is unless
`REFIT_UNPRUNED` (then its S is every input and attention corrects the stream as well): on
SmolLM2 that refit made WikiText-2 validation worse (README, "Dense-target statistics").
`TOKEN_WEIGHTED` weights each token by 1 / mean(goal_t^2) (the stream feeds RMSNorms, which
see errors relative to the token's scale); off by default, measured in the same place.
Pruned-stream forwards per block: attention only (o_proj stats), up to down_proj (its stats),
then the whole refit block (the next block's inputs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cfsp.devices import factories_on, math_dtype
from cfsp.engine.plan import BlockPlan
from cfsp.engine.reconstruct import damped_cholesky
from cfsp.engine.slicing import apply_plan
from cfsp.engine.statistics import centered, finite_rows
from cfsp.engine.stream import block_forward
from cfsp.errors import UsageError

REFIT_UNPRUNED = False  # refit o_proj also when no head was pruned (measured: README)
TOKEN_WEIGHTED = False  # weight token t by 1 / mean(goal_t^2) (measured: README)
ADDITIVE_RTOL = 1e-3  # h_out vs h_in + y_o + y_d, relative to ||h_out|| (float32 rounding)


class _Stop(Exception):
    """Raised by a hook once the module it watches has been seen (the rest of the block is
    not needed for that pass)."""


def target_stats(cfg) -> bool:
    """Whether a prune runs dense-target reconstruction (`stats: target` with a refit)."""
    return cfg.stats == "target" and cfg.reconstruct != "none"


@dataclass
class TargetMoments:
    """Moments of one module's pruned inputs x~ [T, n] and its targets y* [T, m], each token
    weighted by a_t (1 unless given): count = sum a_t, x_sum = sum a_t x_t, ..."""

    count: float
    x_sum: torch.Tensor  # [n]
    gram: torch.Tensor  # [n, n]  sum x x^T
    y_sum: torch.Tensor  # [m]
    cross: torch.Tensor  # [m, n]  sum y x^T
    y_sq: float  # sum ||y||^2

    @classmethod
    def empty(cls, n: int, m: int) -> TargetMoments:
        d = math_dtype()
        z = torch.zeros
        return cls(0, z(n, dtype=d), z(n, n, dtype=d), z(m, dtype=d), z(m, n, dtype=d), 0.0)

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        x, y = finite_rows(x, torch.float32), finite_rows(y, torch.float32)
        a = torch.ones(x.shape[0], device=x.device) if weight is None else weight.reshape(-1)
        a = a.to(x.device, torch.float32)
        ax = x * a[:, None]
        self.count += float(a.sum(dtype=torch.float64))
        self.x_sum += ax.sum(0, dtype=self.x_sum.dtype)
        self.y_sum += (y * a[:, None]).sum(0, dtype=self.y_sum.dtype)
        self.gram += (ax.T @ x).to(self.gram.dtype)
        self.cross += (y.T @ ax).to(self.cross.dtype)
        self.y_sq += float((y.double().square().sum(1) * a.double()).sum())

    def residual_error(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """E ||y* - (W x~ + b)||^2 / E ||y*||^2, exactly from the moments (float64)."""
        w, b = w.to(self.gram), b.to(self.gram)
        quad = ((w @ self.gram) * w).sum() - 2 * (w * self.cross).sum()
        lin = 2 * b @ (w @ self.x_sum) - 2 * b @ self.y_sum + self.count * (b @ b)
        return max(float(self.y_sq + quad + lin), 0.0) / max(self.y_sq, 1e-30)


def refit(w: torch.Tensor, b: torch.Tensor, m: TargetMoments, method: str, damping: float):
    """(W', b') of the module docstring from sliced weights W_S [m, |S|] and bias b [m]."""
    w, b = w.to(m.gram), b.to(m.gram)
    mu_x, mu_y = m.x_sum / m.count, m.y_sum / m.count
    if method == "liar" and w.shape[1] > 0:
        cov = centered(m.gram, m.count, mu_x, mu_x)
        c_ys = centered(m.cross, m.count, mu_y, mu_x)
        c_rs = c_ys - w @ cov  # cross-covariance of the residual r with x~_S
        w = w + torch.cholesky_solve(c_rs.T, damped_cholesky(cov, damping)).T
    return w, mu_y - w @ mu_x


class DenseRecorder:
    """Hooks that keep the dense block's o_proj and down_proj outputs per batch, turned into
    the targets h_mid = h_in + y_o and h_out by `targets` (with the additivity check)."""

    def __init__(self, parts):
        self.y_o: list[torch.Tensor] = []
        self.y_d: list[torch.Tensor] = []
        self.handles = [
            parts.o.register_forward_hook(lambda _m, _a, out: self.y_o.append(out.detach())),
            parts.down.register_forward_hook(lambda _m, _a, out: self.y_d.append(out.detach())),
        ]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def targets(self, inputs: list, outputs: list) -> tuple[list, list]:
        """([h_mid per batch], [h_out per batch]) from the inputs and outputs of the block."""
        self.close()
        mids = []
        for h, out, y_o, y_d in zip(inputs, outputs, self.y_o, self.y_d, strict=True):
            mid = h + y_o.to(h.dtype)
            gap = (out - (mid + y_d.to(h.dtype))).float().norm()
            if gap > ADDITIVE_RTOL * out.float().norm() + 1e-6:
                raise UsageError(
                    "stats=target needs o_proj and down_proj outputs added straight to the "
                    "residual stream; this model normalises them first (use dense or sequential)"
                )
            mids.append(mid)
        return mids, list(outputs)


@torch.no_grad()
def dense_targets(block, parts, hiddens: list, kwargs_list: list) -> tuple[list, list]:
    """Run the dense `block` over the dense stream `hiddens` (advanced in place); return its
    targets ([h_mid], [h_out]) per batch."""
    recorder = DenseRecorder(parts)
    inputs = list(hiddens)
    try:
        for j, h in enumerate(hiddens):
            hiddens[j] = block_forward(block, h, kwargs_list[j])
    finally:
        recorder.close()
    return recorder.targets(inputs, hiddens)


@torch.no_grad()
def refit_block(adapter, block, plan: BlockPlan, cfg, head_dim: int, stream, mids, outs) -> dict:
    """Slice `block` to `plan`, refit o_proj then down_proj towards the dense targets, and move
    the pruned stream `stream` ([h~ per batch], [kwargs per batch]) on through the refit block.
    The block's o_proj / down_proj carry a (zero) bias already. Returns the error row."""
    hiddens, kwargs_list = stream
    dense = adapter.parts(block)
    dense_heads, dense_width = dense.o.in_features // head_dim, dense.down.in_features
    apply_plan(adapter, block, plan, head_dim)
    parts = adapter.parts(block)
    row: dict = {}
    for name, pruned, goals, before in (
        ("o", len(plan.heads) < dense_heads, mids, None),
        ("down", len(plan.channels) < dense_width, outs, parts.o),
    ):
        module = parts.o if name == "o" else parts.down
        if not (pruned or REFIT_UNPRUNED):
            row.update({f"{name}_before": 0.0, f"{name}_after": 0.0})
            continue
        moments = _collect(block, module, hiddens, kwargs_list, goals, before)
        row.update(_apply(module, moments, cfg, name))
        del moments  # one module's Gram at a time
    for j, h in enumerate(hiddens):
        hiddens[j] = block_forward(block, h, kwargs_list[j])
    return row


def _collect(block, module, hiddens, kwargs_list, goals, before) -> TargetMoments:
    """Moments of `module`'s inputs on the pruned stream and its targets goals[j] - h~_j
    (minus the output of `before`, the refit o_proj, when the goal lies past it)."""
    with factories_on(module.weight.device):
        moments = TargetMoments.empty(module.in_features, module.out_features)
    seen: dict = {}

    def keep_before(_m, _a, out):
        seen["before"] = out

    def take(_m, args):
        j = seen["batch"]
        y = goals[j] - hiddens[j]
        if before is not None:
            y = y - seen["before"]
        moments.add(args[0], y, _token_weights(goals[j]) if TOKEN_WEIGHTED else None)
        raise _Stop

    handles = [module.register_forward_pre_hook(take)]
    if before is not None:
        handles.append(before.register_forward_hook(keep_before))
    try:
        for j, h in enumerate(hiddens):
            seen["batch"] = j
            with contextlib.suppress(_Stop):
                block_forward(block, h, kwargs_list[j])
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _token_weights(goal: torch.Tensor) -> torch.Tensor:
    """1 / mean_k goal_tk^2 per token: the stream feeds an RMSNorm, so what matters is the
    error relative to the token's own scale, not tokens of huge norm (the first position)."""
    return 1.0 / goal.float().square().mean(-1).clamp_min(1e-12)


def _apply(module, moments: TargetMoments, cfg, name: str) -> dict:
    """Refit `module` in place from `moments`; its errors against the target before / after."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else torch.zeros(w.shape[0])
    before = moments.residual_error(w, b)
    w_new, b_new = refit(w, b, moments, cfg.reconstruct, cfg.damping)
    after = moments.residual_error(w_new, b_new)
    module.weight.copy_(w_new.to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(b_new.to(module.bias.dtype))
    return {f"{name}_before": before, f"{name}_after": after}
