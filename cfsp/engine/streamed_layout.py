"""What the streamed engine writes: the pruned layout, decided before any block is written.

The in-memory engine decides the compensation biases after every block is pruned
(cfsp.engine.driver.settle_biases looks at all of them). Here each block is written as soon as it
is pruned, so the final layout (per block: which tensors, which shapes; and the config) is
computed first on a meta copy of the model, pruned with cfsp's own functions, given which
added biases will be non-zero (`predicted_biases`); each block is then written in that layout
(`conform`). If a predicted bias comes out exactly zero, the layout is recomputed and the
written shards are rewritten (`rewrite_blocks`), so the result is the in-memory engine's.
Outside the blocks (embeddings, final norm, LM head): one shard per module, copied.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from cfsp.config import PruneConfig
from cfsp.engine import dense_target
from cfsp.engine.driver import enable_biases, settle_biases
from cfsp.engine.plan import BlockPlan
from cfsp.engine.slicing import apply_plan, update_config
from cfsp.engine.streamed_weights import ShardWriter, shard_name
from cfsp.engine.target import Target
from cfsp.errors import CfspError, UsageError

ROLES = {"o": "o", "mlp": "down"}  # settle_biases' role names -> BlockParts attribute


def predicted_biases(model, plans: list[BlockPlan], cfg: PruneConfig) -> dict[str, bool]:
    """Which added compensation biases (module kinds without a stock bias) will be non-zero
    somewhere: those of a kind whose inputs some block prunes (a fold adds W_P p, zero only in
    degenerate cases). Stock biases stay whatever they are, so they count as False."""
    target = Target.of(model)
    adapter, geo = target.adapter, target.geometry
    if cfg.reconstruct == "none":
        return {role: False for role in ROLES}
    refit_all = dense_target.target_stats(cfg) and dense_target.REFIT_UNPRUNED
    pruned = {  # stats=target may refit a module that lost no input, towards the dense stream
        "o": refit_all or any(len(p.heads) < geo.num_heads for p in plans),
        "mlp": refit_all or any(len(p.channels) < geo.intermediate for p in plans),
    }
    return {role: pruned[role] and not adapter.has_bias(model.config, role) for role in ROLES}


def final_layout(model, plans: list[BlockPlan], cfg: PruneConfig, nonzero: dict[str, bool]):
    """Per block {name: (shape, dtype)} of the pruned model, and a meta copy of it (its config
    is the one to write, its parameters the ones to count), made from the dense skeleton
    `model` with cfsp's own functions (apply_plan, update_config, enable_biases and
    settle_biases), given which added compensation biases are non-zero."""
    shadow = copy.deepcopy(model)
    target = Target.of(shadow)
    adapter, head_dim = target.adapter, target.geometry.head_dim
    for block, plan in zip(target.layers, plans, strict=True):
        apply_plan(adapter, block, plan, head_dim)
    update_config(shadow.config, [p.widths() for p in plans], head_dim)
    if cfg.reconstruct != "none":
        stock = enable_biases(target)
        for role, attr in ROLES.items():
            if nonzero[role] and not stock[role]:
                for block in target.layers:
                    getattr(adapter.parts(block), attr).bias.data.fill_(1.0)
        settle_biases(target, stock)
    layout = [
        {k: (tuple(v.shape), v.dtype) for k, v in block.state_dict().items()}
        for block in target.layers
    ]
    return layout, shadow


def conform(state: dict, layout: dict, prefix: str) -> dict:
    """A block's tensors as `layout` has them, named from the model's root: zero biases the
    layout adds are added, biases it drops (all-zero ones, per settle_biases) are dropped."""
    out = {}
    for key, (shape, dtype) in layout.items():
        tensor = state.get(key)
        if tensor is None:
            tensor = torch.zeros(shape, dtype=dtype)
        if tuple(tensor.shape) != shape:
            raise CfspError(f"{prefix}{key}: pruned to {tuple(tensor.shape)}, expected {shape}")
        out[prefix + key] = tensor
    for key in set(state) - set(layout):
        if bool(state[key].abs().sum() > 0):
            raise CfspError(f"{prefix}{key}: a non-zero tensor the pruned layout has no place for")
    return out


def nonzero_biases(adapter, block, stock: dict[str, bool], cfg: PruneConfig) -> dict[str, bool]:
    if cfg.reconstruct == "none":
        return {role: False for role in ROLES}
    parts = adapter.parts(block)
    return {
        role: not stock[role] and bool(getattr(parts, attr).bias.abs().sum() > 0)
        for role, attr in ROLES.items()
    }


def outside_groups(stream) -> dict[str, list[str]]:
    """Tensors outside the blocks, grouped by module (embeddings, final norm, LM head)."""
    prefixes = tuple(stream.prefix(block) for block in stream.layers())
    groups: dict[str, list[str]] = {}
    for name in stream.tensors:
        if not name.startswith(prefixes):
            groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return groups


def check_shard_limit(stream, groups: dict[str, list[str]], limit: int) -> None:
    """Refuse, before any pass, a model with a block or outside module larger than `limit`
    bytes in the run's dtype: each is written as one shard (dense sizes; pruning shrinks blocks,
    but which ones is not known yet)."""
    size = torch.empty((), dtype=stream.dtype).element_size()
    named = dict(groups)
    for block in stream.layers():
        prefix = stream.prefix(block)
        named[prefix[:-1]] = [k for k in stream.tensors if k.startswith(prefix)]
    sizes = {
        name: sum(math.prod(stream.tensors[k]) for k in keys) * size for name, keys in named.items()
    }
    name = max(sizes, key=sizes.get)
    if sizes[name] > limit:
        raise UsageError(
            f"--stream writes one shard per block and per embedding / norm / LM head; {name} "
            f"takes {sizes[name]:,} bytes, over the max shard size of {limit:,}: raise it, or "
            "prune without --stream"
        )


def write_outside(stream, groups: dict[str, list[str]], writer: ShardWriter) -> None:
    """Copy them (in the run's dtype) one module at a time: one shard each."""
    for index, names in enumerate(groups.values()):
        writer.write(index, stream.reader.read(names, torch.device("cpu"), stream.dtype))


def rewrite_blocks(stream, out: Path, writer: ShardWriter, layout, first: int) -> None:
    """Bring written block shards to a corrected layout (only when a predicted bias was zero)."""
    from safetensors.torch import load_file

    for index, block in enumerate(stream.layers()):
        prefix = stream.prefix(block)
        tensors = load_file(str(out / shard_name(first + index, writer.total)))
        state = {k[len(prefix) :]: v for k, v in tensors.items()}
        writer.write(first + index, conform(state, layout[index], prefix))
