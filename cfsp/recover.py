"""Recovery fine-tuning after pruning: IG-LoRA (importance-guided LoRA) and uniform LoRA.

IG-LoRA gives each decoder block a LoRA rank that follows its coarse importance s_l > 0
(ALGORITHMS.md 1.4):

    r_l = clip(round(rbar * s_l / mean(s)), 1, cap_l)

then moves ranks by +/-1 until the trainable-parameter count matches uniform LoRA (r_l = rbar for
every block). A rank-r adapter on a module W in R^{out x in} trains r * (in + out) parameters, and
pruned blocks have different widths, so the match is made on parameters, not on the rank sum:
see `ig_ranks`. Adapters are trained with the causal-LM loss on token windows and merged into the
weights, so the result is a plain model with the same state_dict keys and shapes as the input
(compensation biases on o_proj / down_proj are kept as they are).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cfsp.config import LORA_TARGETS, RecoverConfig
from cfsp.errors import UsageError

DEFAULT_TARGETS = LORA_TARGETS


# -- ranks ----------------------------------------------------------------------------------------


def uniform_ranks(n_blocks: int, mean_rank: int, caps: Sequence[int]) -> list[int]:
    """The baseline: r_l = rbar for each of the `n_blocks` blocks (every cap_l must allow it)."""
    if mean_rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {mean_rank}")
    if len(caps) != n_blocks:
        raise ValueError(f"{len(caps)} caps for {n_blocks} blocks")
    for index, cap in enumerate(caps):
        if mean_rank > cap:
            raise UsageError(
                f"LoRA rank {mean_rank} is larger than block {index} allows ({cap}); lower the rank"
            )
    return [mean_rank] * n_blocks


def ig_ranks(
    importance: Sequence[float],
    mean_rank: int,
    caps: Sequence[int],
    costs: Sequence[int] | None = None,
) -> list[int]:
    """Importance-guided ranks, one per block, with the uniform baseline's parameter count.

    importance: s_l >= 0 per block (L values, sum > 0); caps: the largest rank block l allows
    (min over its target modules of min(in, out)); costs: c_l = trainable parameters per unit of
    rank in block l (sum over its target modules of in + out); None means equal costs.

        budget B = rbar * sum_l c_l             (uniform LoRA's trainable parameters)
        x_l = clip(lam * s_l, 1, cap_l)         (ideal, real-valued; sum_l c_l x_l = B)
        r_l = round(x_l)                        (round half up)

    When no floor or cap binds, lam = rbar / mean_c(s) with mean_c(s) = sum c_l s_l / sum c_l;
    with equal costs that is r_l = max(1, round(rbar * s_l / mean(s))) (ALGORITHMS.md 1.4).
    Otherwise lam is found by bisection, so the ranks a cap takes away go to the other blocks in
    proportion to their importance. Then, while D = sum_l r_l c_l - B != 0,
    step one rank by -1 (D > 0) or +1 (D < 0) in the block with the largest rounding residual
    (r_l - x_l when decrementing, x_l - r_l when incrementing) among those whose step keeps
    1 <= r_l <= cap_l and makes |D| smaller; stop when no step helps. Hence |D| <= max_l c_l / 2,
    at most half the parameters of a rank-1 adapter on the widest block. With equal costs D is a
    multiple of c, so sum_l r_l == L * rbar exactly.
    """
    n = len(importance)
    if n == 0:
        raise UsageError("IG-LoRA needs one importance score per block, got none")
    if mean_rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {mean_rank}")
    scores = [float(s) for s in importance]
    if any(not math.isfinite(s) or s < 0 for s in scores) or sum(scores) <= 0:
        raise UsageError(f"block importance must be finite, >= 0 and not all zero: {scores}")
    costs = [1] * n if costs is None else list(costs)
    if len(caps) != n or len(costs) != n:
        raise ValueError(f"{n} importance scores, {len(caps)} caps, {len(costs)} costs")
    uniform_ranks(n, mean_rank, caps)  # the budget must be feasible for the baseline
    budget = mean_rank * sum(costs)
    ideal = _ideal_ranks(scores, caps, costs, budget)
    ranks = [min(cap, max(1, math.floor(x + 0.5))) for x, cap in zip(ideal, caps, strict=True)]
    gap = sum(r * c for r, c in zip(ranks, costs, strict=True)) - budget
    while gap != 0:
        step = -1 if gap > 0 else 1
        order = sorted(range(n), key=lambda i: step * (ideal[i] - ranks[i]), reverse=True)
        for i in order:
            if 1 <= ranks[i] + step <= caps[i] and abs(gap + step * costs[i]) < abs(gap):
                ranks[i] += step
                gap += step * costs[i]
                break
        else:
            break
    return ranks


def _ideal_ranks(
    scores: Sequence[float], caps: Sequence[int], costs: Sequence[int], budget: float
) -> list[float]:
    """x_l = clip(lam * s_l, 1, cap_l) with sum_l c_l x_l = budget (bisection on lam)."""

    def ideal(lam: float) -> list[float]:
        return [min(cap, max(1.0, lam * s)) for s, cap in zip(scores, caps, strict=True)]

    def spent(lam: float) -> float:
        return sum(c * x for c, x in zip(costs, ideal(lam), strict=True))

    lam = budget / sum(c * s for c, s in zip(costs, scores, strict=True))  # rbar / mean_c(s)
    if all(1.0 <= x <= cap for x, cap in zip((lam * s for s in scores), caps, strict=True)):
        return ideal(lam)
    lo, hi = 0.0, max(cap / s for s, cap in zip(scores, caps, strict=True) if s > 0)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    return ideal(hi)


# -- target modules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTargets:
    """The LoRA target modules of one block: full module names and their (in, out) shapes."""

    names: list[str]
    shapes: list[tuple[int, int]]

    @property
    def cap(self) -> int:
        return min(min(shape) for shape in self.shapes)

    @property
    def cost(self) -> int:
        """Trainable parameters per unit of rank: sum of in + out over the modules."""
        return sum(i + o for i, o in self.shapes)


def block_targets(model: nn.Module, targets: Sequence[str]) -> list[BlockTargets]:
    """Per decoder block, its nn.Linear modules whose last name part is in `targets` (a name
    of a fused role, e.g. q_proj on Phi-3, means the module that holds it: qkv_proj)."""
    from cfsp.arch import adapter_for

    adapter = adapter_for(model)
    names = {id(module): name for name, module in model.named_modules()}
    wanted = {adapter.module_name(t) for t in targets}
    blocks = []
    for block in adapter.layers(model):
        found = [
            (names[id(m)], (m.in_features, m.out_features))
            for m in block.modules()
            if isinstance(m, nn.Linear) and names[id(m)].rsplit(".", 1)[-1] in wanted
        ]
        if not found:
            raise UsageError(f"decoder block {len(blocks)} has none of the LoRA targets {targets}")
        blocks.append(BlockTargets([n for n, _ in found], [s for _, s in found]))
    missing = sorted(wanted - {n.rsplit(".", 1)[-1] for b in blocks for n in b.names})
    if missing:
        raise UsageError(
            f"LoRA target modules {missing} are not linear layers of this model's blocks; "
            f"use names from {DEFAULT_TARGETS}"
        )
    return blocks


def check_rank(blocks: Sequence[BlockTargets], rank: int) -> None:
    """Every target module must allow the mean rank: rank <= min(in, out)."""
    if rank < 1:
        raise UsageError(f"LoRA rank must be at least 1, got {rank}")
    for block in blocks:
        for name, shape in zip(block.names, block.shapes, strict=True):
            if rank > min(shape):
                raise UsageError(
                    f"LoRA rank {rank} is larger than {name} allows (at most {min(shape)}, "
                    f"its shape is in={shape[0]} out={shape[1]}); lower recover.rank"
                )


def plan_ranks(
    blocks: Sequence[BlockTargets], importance: Sequence[float] | None, cfg: RecoverConfig
) -> list[int]:
    """Rank per block for `cfg.mode` ("ig" needs `importance`, one score per block)."""
    check_rank(blocks, cfg.rank)
    caps = [b.cap for b in blocks]
    if cfg.mode == "uniform":
        return uniform_ranks(len(blocks), cfg.rank, caps)
    if importance is None or len(importance) != len(blocks):
        got = "none" if importance is None else len(importance)
        raise UsageError(f"IG-LoRA needs {len(blocks)} block importance scores, got {got}")
    return ig_ranks(importance, cfg.rank, caps, [b.cost for b in blocks])


def lora_config(blocks: Sequence[BlockTargets], ranks: Sequence[int], cfg: RecoverConfig):
    """A peft LoraConfig with one exact entry per target module.

    peft 0.21 matches a pattern key k against a module name with re.match(rf"(.*\\.)?({k})$"),
    so keys are re.escape'd full names: "model\\.layers\\.1\\.mlp\\.down_proj" matches only
    names ending in ".model.layers.1.mlp.down_proj" (or equal to it), never layer 11.
    alpha_l = alpha * r_l / rank keeps the scaling alpha_l / r_l = alpha / rank of the uniform
    baseline in every block, so the two modes differ in capacity only.
    """
    from peft import LoraConfig

    rank_pattern, alpha_pattern, names = {}, {}, []
    for block, r in zip(blocks, ranks, strict=True):
        for name in block.names:
            names.append(name)
            rank_pattern[re.escape(name)] = int(r)
            alpha_pattern[re.escape(name)] = cfg.alpha * r / cfg.rank
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type="CAUSAL_LM",
    )


# -- training -------------------------------------------------------------------------------------


def check_windows(windows: torch.Tensor, cfg: RecoverConfig) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise UsageError(
            f"recovery needs token windows [N, L] with N >= 1, got shape {tuple(windows.shape)}; "
            "give it more text"
        )
    if windows.shape[1] < 2:
        raise UsageError(
            f"recovery windows have {windows.shape[1]} token(s); the causal-LM loss needs at "
            "least 2: use a longer seqlen"
        )
    if windows.shape[0] < cfg.batch:
        raise UsageError(
            f"recovery needs at least recover.batch={cfg.batch} windows, got {windows.shape[0]}; "
            "give it more text or lower recover.batch"
        )


def batches(windows: torch.Tensor, cfg: RecoverConfig):
    """Yield cfg.steps batches [batch, min(L, seqlen)]: seeded epochs over the windows (each
    reshuffled), each window cropped at a seeded random offset when longer than cfg.seqlen."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n, length = windows.shape
    span = min(length, cfg.seqlen)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(cfg.steps):
        if len(order) < cfg.batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        pick, order = order[: cfg.batch], order[cfg.batch :]
        offset = int(torch.randint(0, length - span + 1, (1,), generator=gen))
        yield windows[pick, offset : offset + span]


def train_lora(
    model: nn.Module,
    windows: torch.Tensor,
    importance: Sequence[float] | None,
    cfg: RecoverConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
):
    """Wrap `model` (in place) with LoRA adapters and train them; return (peft_model, record).

    windows: token ids [N, L]. Each step takes `cfg.batch` windows, loss = causal-LM loss of
    model(ids, labels=ids), AdamW(lr) on the adapters only; base weights stay frozen. The model
    stays in eval mode (no dropout) so training is deterministic for a seed on CPU.
    on_step(step, loss) is called after each optimizer step, step = 1..cfg.steps.
    record: {"mode", "ranks", "trainable_params", "losses", "wall_s"}.
    """
    from peft import get_peft_model

    t0 = time.perf_counter()
    check_windows(windows, cfg)
    blocks = block_targets(model, cfg.targets)
    ranks = plan_ranks(blocks, importance, cfg)
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    peft_model = get_peft_model(model, lora_config(blocks, ranks, cfg))
    peft_model._cfsp_was_trainable = was_trainable
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    device = next(model.parameters()).device
    losses = []
    bar = tqdm(  # disable=None: drawn only when stderr is a terminal
        batches(windows, cfg), total=cfg.steps, desc="recover", disable=None if progress else True
    )
    for step, ids in enumerate(bar, start=1):
        ids = ids.to(device)
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(step, losses[-1])
    record = {
        "mode": cfg.mode,
        "ranks": list(ranks),
        "trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "wall_s": time.perf_counter() - t0,
        "device": str(device),
    }
    return peft_model, record


def merge(peft_model) -> nn.Module:
    """Fold the adapters into the weights (W += scaling * B A) and return the plain model, with
    the parameters' original requires_grad flags, in eval mode."""
    model = peft_model.merge_and_unload()
    was_trainable = getattr(peft_model, "_cfsp_was_trainable", {})
    for name, p in model.named_parameters():
        p.requires_grad_(was_trainable.get(name, True))
    return model.eval()


def recover(
    model: nn.Module,
    windows: torch.Tensor,
    importance: Sequence[float] | None,
    cfg: RecoverConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train LoRA adapters (`train_lora`) and merge them; return (merged model, record).

    The model is modified in place; the returned model has the same state_dict keys and shapes.
    """
    peft_model, record = train_lora(model, windows, importance, cfg, progress, on_step)
    t0 = time.perf_counter()
    merged = merge(peft_model)
    record["wall_s"] += time.perf_counter() - t0
    return merged, record
