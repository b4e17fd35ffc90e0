"""The block loop: calibration activations walk through the decoder one block at a time.

The first block's inputs are caught by a hook on the unmodified model (the model's own embedding
and mask/rotary code runs, nothing is re-implemented; models whose layer types get different
masks / rotary tables run on to the first block of each type to catch those). Then each block
runs on the previous block's outputs, [N, L, d] split in batches, while hooks on o_proj and
down_proj accumulate their inputs' statistics (`ChannelStats`). Memory: the model, one set of
activations, and the statistics of one block. The Gram product of each batch runs in float32
(fast BLAS, or `gram_dtype`), the sums across batches in `cfsp.devices.math_dtype` of the
block's device (float64 on the CPU, float32 on CUDA), on that device.

`BlockStream.walk` is the only such loop: capture walks the dense model; sequential
reconstruction walks it while pruning each block after its statistics are taken, so the next
block sees the pruned block's outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cfsp.devices import factories_on
from cfsp.engine.statistics import BlockStats, ChannelStats, angular_distance
from cfsp.engine.target import Target


class _StopForward(Exception):
    pass


def layer_type(block) -> str | None:
    """Which inputs the model passes a block besides the hidden states.

    Models whose blocks get different masks / rotary tables (Gemma 3's sliding and global
    layers, Qwen2/3 with sliding layers) index them by `config.layer_types[i]`, which
    transformers also stores on the block's attention as `layer_type`; None elsewhere.
    """
    return getattr(getattr(block, "self_attn", None), "layer_type", None)


class BlockKwargs(dict):
    """One batch's keyword arguments for the blocks (mask, rotary, ...), per layer type."""

    def for_block(self, block) -> dict:
        return self[layer_type(block)]


def first_block_inputs(target: Target, ids: torch.Tensor, batch_size: int):
    """Run the model's own embedding/mask/rotary code and catch what enters block 0.

    The keyword arguments are caught at the first block of every layer type (the forward stops
    there; with a single type, at block 0). Returns ([hidden [B, L, d] per batch],
    [BlockKwargs per batch]), on the CPU.
    """
    model, layers = target.model, target.layers
    firsts: dict[str | None, int] = {}
    for index, block in enumerate(layers):
        firsts.setdefault(layer_type(block), index)
    last = max(firsts.values())
    caught: dict = {}

    def catch(kind: str | None, index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                caught["hidden"] = hidden
            caught["kwargs"][kind] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if index == last:
                raise _StopForward

        return hook

    handles = [
        layers[index].register_forward_pre_hook(catch(kind, index), with_kwargs=True)
        for kind, index in firsts.items()
    ]
    device = next(model.parameters()).device
    hiddens, kwargs_list = [], []
    try:
        for start in range(0, ids.shape[0], batch_size):
            caught["kwargs"] = BlockKwargs()
            with contextlib.suppress(_StopForward):  # raised by the hook of the last block needed
                model(ids[start : start + batch_size].to(device), use_cache=False)
            hiddens.append(caught["hidden"].detach())
            kwargs_list.append(caught["kwargs"])
    finally:
        for handle in handles:
            handle.remove()
    return hiddens, kwargs_list


def _accumulate(stats: ChannelStats, gram_dtype: torch.dtype):
    def hook(_module, args):
        stats.add(args[0], gram_dtype)

    return hook


@torch.no_grad()
def run_block(
    block,
    parts,
    hiddens: list[torch.Tensor],
    kwargs_list: list[dict],
    gram_dtype: torch.dtype = torch.float32,
    advance: bool = True,
    empty=ChannelStats.empty,
    empty_o=None,
) -> BlockStats:
    """Run one block over every batch, collecting its statistics.

    With `advance`, each batch's output replaces its input in `hiddens` (the next block's input).
    `empty(n)` makes the statistics of n input channels (the streamed engine's first pass keeps
    O(n) moments instead of the Gram matrix); `empty_o` those of o_proj's (default `empty`).
    """
    with factories_on(parts.o.weight.device):  # the statistics live where the block runs
        o_stats = (empty_o or empty)(parts.o.in_features)
        down_stats = empty(parts.down.in_features)
    hooks = [
        parts.o.register_forward_pre_hook(_accumulate(o_stats, gram_dtype)),
        parts.down.register_forward_pre_hook(_accumulate(down_stats, gram_dtype)),
    ]
    angular_sum, tokens = 0.0, 0
    try:
        for j, h in enumerate(hiddens):
            out = block_forward(block, h, kwargs_list[j])
            dist = angular_distance(h, out)
            angular_sum += float(dist.sum())
            tokens += dist.numel()
            if advance:
                hiddens[j] = out  # the old input is freed
    finally:
        for hook in hooks:
            hook.remove()
    return BlockStats(angular_sum / tokens, tokens, o_stats, down_stats)


def block_forward(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if isinstance(kwargs, BlockKwargs):
        kwargs = kwargs.for_block(block)
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class BlockStream:
    """Calibration windows `ids` [N, L] as hidden states entering the current block."""

    def __init__(
        self,
        target: Target,
        ids: torch.Tensor,
        batch_size: int = 8,
        gram_dtype: torch.dtype = torch.float32,
    ):
        self.target = target
        self.gram_dtype = gram_dtype
        self.hiddens, self.kwargs_list = first_block_inputs(target, ids, batch_size)

    def walk(self, rewrites: bool = False) -> Iterator[tuple[int, torch.nn.Module, BlockStats]]:
        """Yield (index, block, its statistics) for every block, in order.

        Without `rewrites` the one forward that collects a block's statistics also moves the
        activations on (each output replaces its input). With `rewrites` the caller may change
        the block in place after receiving it (prune it): the inputs are kept, and once the
        caller is done they are run through the changed block to become the next inputs.
        """
        for index, block in enumerate(self.target.layers):
            parts = self.target.adapter.parts(block)
            stats = run_block(
                block, parts, self.hiddens, self.kwargs_list, self.gram_dtype, not rewrites
            )
            yield index, block, stats
            if rewrites:
                for j, h in enumerate(self.hiddens):
                    self.hiddens[j] = block_forward(block, h, self.kwargs_list[j])
