"""Choose the CFSP allocation's control by held-out loss (`control: auto`).

The control a sets how far the per-block keep ratios follow the blocks' angular distances
(allocate.py: s_l = sigmoid(a z_l)): a = 0 keeps the same share in every block, a = 0.5 leans
on the distances. The best a depends on the model and the budget (WikiText-2 validation, README:
at p = 0.5 Gemma-3-270M gains 6% with a = 0 where SmolLM2-135M loses 72%). With `control: auto`
every candidate a in CONTROLS gives a plan (same criterion, same counts rule); each plan is
applied to copies of the dense blocks, one block at a time, with the fold and slice of the prune
itself (driver.prune_block), and H held-out calibration windows (drawn beside the calibration
windows, overlapping none: cfsp.data) run through the pruned copies. The plan with the lowest
mean next-token loss on them is kept:

    a* = argmin_a  -1/|T| sum_t log p_a(x_{t+1} | x_{<=t}),   t over the held-out tokens

A tie (equal loss) goes to the earlier candidate. Only the calibration source is read: no
evaluation text takes part in the choice.
Cost: per block, one fold per distinct candidate plan (solves, no forward); per candidate one
pruned forward over the held-out windows, ~(1 - p) H / N F (N calibration windows), and the LM
head over them. Memory: one dense block and one pruned copy at a time, and per candidate the
held-out hidden states [H, L, d] (O(width), not width^2).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfsp.config import PruneConfig
from cfsp.engine.driver import _zero_bias, block_scores, plan_from_scores, prune_block
from cfsp.engine.plan import BlockPlan, Geometry, PrunePlan
from cfsp.engine.statistics import BlockStats, Statistics
from cfsp.engine.stream import block_forward, first_block_inputs
from cfsp.engine.target import Target

log = logging.getLogger(__name__)

# The default's slope and the uniform allocation: what won on some model and budget of the
# validation ablation (README). 0.25 was a third candidate; it was chosen once in 8 validation
# runs, where it changed nothing, and each candidate costs a pruned forward.
CONTROLS: tuple[float, ...] = (0.5, 0.0)


def reads_heldout(cfg: PruneConfig) -> bool:
    """Whether a config chooses its control when given held-out windows: `control: auto`, the
    CFSP allocation, something to prune, dense statistics (the choice folds from the captured
    Grams)."""
    return (
        cfg.control == "auto"
        and cfg.allocation == "cfsp"
        and cfg.budget > 0
        and cfg.stats == "dense"
    )


def chooses(cfg: PruneConfig, heldout: torch.Tensor | None) -> bool:
    """Whether a run chooses the control: a config that reads them, and held-out windows."""
    return reads_heldout(cfg) and heldout is not None and heldout.shape[0] > 0


def fixed(cfg: PruneConfig, control: float) -> PruneConfig:
    return cfg.model_copy(update={"control": control})


@dataclass
class Choice:
    """The candidates, their held-out losses and the one kept."""

    controls: list[float]
    losses: list[float]
    chosen: float
    tokens: int

    def to_dict(self) -> dict:
        return {
            "candidates": self.controls,
            "heldout_loss": [round(x, 5) for x in self.losses],
            "chosen": self.chosen,
            "heldout_tokens": self.tokens,
        }


def candidate_plans(
    geo: Geometry, angular: torch.Tensor, scores: list[tuple], cfg: PruneConfig
) -> list[PrunePlan]:
    return [plan_from_scores(geo, angular, scores, fixed(cfg, a)) for a in CONTROLS]


@torch.no_grad()
def heldout_losses(
    adapter,
    head_dim: int,
    plans: list[PrunePlan],
    walk: Iterable[tuple[int, torch.nn.Module, BlockStats]],
    inputs: tuple[list[torch.Tensor], list],
    loss: Callable[[list[torch.Tensor]], tuple[float, int]],
    cfg: PruneConfig,
    head_ready=contextlib.nullcontext,
) -> tuple[list[float], int]:
    """Mean held-out loss of every plan. `walk` yields (index, dense block, its statistics)
    in order; `inputs` = (held-out hidden states entering block 0 per batch, their block
    kwargs); `loss(hiddens)` -> (summed loss, tokens) from the last block's outputs, run
    inside `head_ready()` (the streamed engine loads the final norm and LM head there)."""
    first, kwargs = inputs
    states = [list(first) for _ in plans]
    for index, block, stats in walk:
        done: dict[tuple, torch.nn.Module] = {}
        for c, plan in enumerate(plans):
            key = _key(plan.blocks[index])
            if key not in done:
                done.clear()  # one pruned copy alive at a time (plans rarely repeat)
                done[key] = _pruned_copy(adapter, block, plan.blocks[index], stats, cfg, head_dim)
            pruned = done[key]
            states[c] = [block_forward(pruned, h, kwargs[j]) for j, h in enumerate(states[c])]
    with head_ready():
        sums = [loss(hiddens) for hiddens in states]
    return [s / max(1, n) for s, n in sums], sums[0][1]


def _key(plan: BlockPlan) -> tuple:
    return (tuple(plan.heads), tuple(plan.channels))


def _pruned_copy(adapter, block, plan: BlockPlan, stats, cfg: PruneConfig, head_dim: int):
    pruned = copy.deepcopy(block)
    if cfg.reconstruct != "none":
        parts = adapter.parts(pruned)
        _zero_bias(parts.o)
        _zero_bias(parts.down)
    prune_block(adapter, pruned, copy.deepcopy(plan), stats, cfg, head_dim, measure=False)
    return pruned


def pick(plans: list[PrunePlan], losses: list[float], tokens: int) -> tuple[PrunePlan, Choice]:
    best = min(range(len(plans)), key=lambda c: (losses[c], c))
    choice = Choice(list(CONTROLS), losses, CONTROLS[best], tokens)
    log.info(
        "control auto: held-out loss %s over %d tokens -> control %g",
        ", ".join(f"{a:g}: {x:.4f}" for a, x in zip(CONTROLS, losses, strict=True)),
        tokens,
        choice.chosen,
    )
    return plans[best], choice


def head_loss(model, adapter, ids: torch.Tensor, batch_size: int):
    """loss(hiddens) for `heldout_losses`: the model's final norm and LM head (with its logit
    soft-capping, if any) over the last block's outputs, next-token cross-entropy summed."""
    norm = adapter.decoder(model).norm
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def loss(hiddens: list[torch.Tensor]) -> tuple[float, int]:
        total, count = 0.0, 0
        for j, h in enumerate(hiddens):
            labels = ids[j * batch_size : (j + 1) * batch_size, 1:].to(h.device)
            logits = head(norm(h))[:, :-1].float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            count += labels.numel()
        return total, count

    return loss


def choose_in_memory(
    target: Target, stats: Statistics, cfg: PruneConfig, heldout: torch.Tensor, batch_size: int
) -> tuple[PrunePlan, Choice]:
    """The in-memory engine's choice: every block and its Grams are at hand."""
    geo = target.geometry
    plans = candidate_plans(geo, stats.angular(), block_scores(target, stats, cfg), cfg)
    inputs = first_block_inputs(target, heldout, batch_size)
    walk = ((i, block, stats.blocks[i]) for i, block in enumerate(target.layers))
    loss = head_loss(target.model, target.adapter, heldout, batch_size)
    losses, tokens = heldout_losses(target.adapter, geo.head_dim, plans, walk, inputs, loss, cfg)
    return pick(plans, losses, tokens)
