"""One forward pass over calibration windows, block by block, collecting every statistic.

For block l with input h_l and output h_{l+1} [N, L, d] (residual included):
  angular_l = mean_t arccos(cos(h_{l,t}, h_{l+1,t})) / pi      (NaN cos -> 0.5)
For the input X [T, n] of o_proj (n = heads * head_dim) and of down_proj (n = FFN width):
  count T, sum_j X_tj, and the Gram matrix G = X^T X [n, n], accumulated in float64.
Mean, variance, L2 norm and covariance all follow from these (see `ChannelStats`).

Streaming: the first block's inputs are caught by a hook on the unmodified model (the model's
own embedding and mask/rotary code runs, nothing is re-implemented; models whose layer types
get different masks / rotary tables run on to the first block of each type to catch those),
then each block runs on the previous block's outputs, which replace its inputs in place.
Memory: the model, one set of activations [N, L, d], and the statistics of one block. The Gram
product of each batch runs in float32 (fast BLAS), the sums across batches are float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cfsp.arch import adapter_for
from cfsp.data import TokenWindows
from cfsp.errors import CfspError
from cfsp.faults import kill_point
from cfsp.io import atomic_file

log = logging.getLogger(__name__)


@dataclass
class ChannelStats:
    """Running moments of one module's input channels: count T, sum [n], Gram X^T X [n, n]."""

    count: int
    sum: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def empty(cls, n: int) -> ChannelStats:
        return cls(0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64))

    def add(self, x: torch.Tensor, gram_dtype: torch.dtype = torch.float32) -> None:
        x = x.reshape(-1, x.shape[-1]).to(gram_dtype)  # [T, n]
        if not torch.isfinite(x).all():
            raise CfspError(
                "non-finite activations during calibration (NaN/inf): the model or "
                "its dtype overflows on this text; try --dtype float32"
            )
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.gram += (x.T @ x).to(torch.float64)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def sq_norm(self) -> torch.Tensor:
        """||X_j||_2^2 over calibration tokens."""
        return self.gram.diagonal().clone()

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_norm.clamp_min(0).sqrt()

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_norm / self.count - self.mean**2).clamp_min(0)

    @property
    def cov(self) -> torch.Tensor:
        mean = self.mean
        return self.gram / self.count - torch.outer(mean, mean)


@dataclass
class BlockStats:
    angular: float
    tokens: int
    o: ChannelStats
    down: ChannelStats


@dataclass
class Statistics:
    blocks: list[BlockStats]
    fingerprint: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def angular(self) -> torch.Tensor:
        return torch.tensor([b.angular for b in self.blocks], dtype=torch.float64)

    def save(self, path) -> None:
        tensors, meta = {}, {"fingerprint": self.fingerprint, "wall_s": self.wall_s, "blocks": []}
        for i, b in enumerate(self.blocks):
            for name, st in (("o", b.o), ("down", b.down)):
                tensors[f"{i}.{name}.sum"] = st.sum
                tensors[f"{i}.{name}.gram"] = st.gram
            meta["blocks"].append(
                {
                    "angular": b.angular,
                    "tokens": b.tokens,
                    "o_count": b.o.count,
                    "down_count": b.down.count,
                }
            )
        import json

        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"cfsp": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> Statistics:
        import json

        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["cfsp"])
        tensors = load_file(str(path))
        blocks = []
        for i, m in enumerate(meta["blocks"]):
            blocks.append(
                BlockStats(
                    angular=m["angular"],
                    tokens=m["tokens"],
                    o=ChannelStats(m["o_count"], tensors[f"{i}.o.sum"], tensors[f"{i}.o.gram"]),
                    down=ChannelStats(
                        m["down_count"], tensors[f"{i}.down.sum"], tensors[f"{i}.down.gram"]
                    ),
                )
            )
        return cls(blocks, meta["fingerprint"], meta.get("wall_s", 0.0))


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


def first_block_inputs(model, ids: torch.Tensor, batch_size: int):
    """Run the model's own embedding/mask/rotary code and catch what enters block 0.

    The keyword arguments are caught at the first block of every layer type (the forward stops
    there; with a single type, at block 0). Returns ([hidden [B, L, d] per batch],
    [BlockKwargs per batch]), on the CPU.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
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


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """arccos(cos(h_in, h_out)) / pi per token, NaN cosines (zero vectors) as 0.5. [B, L]"""
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    cos = torch.nan_to_num(cos, nan=0.0)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _accumulate(stats: ChannelStats, gram_dtype: torch.dtype):
    def hook(_module, args):
        stats.add(args[0], gram_dtype)

    return hook


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def run_block(
    block,
    parts,
    hiddens: list[torch.Tensor],
    kwargs_list: list[dict],
    gram_dtype: torch.dtype = torch.float32,
    advance: bool = True,
) -> BlockStats:
    """Run one block over every batch, collecting its statistics.

    With `advance`, each batch's output replaces its input in `hiddens` (the next block's input).
    """
    o_stats = ChannelStats.empty(parts.o.in_features)
    down_stats = ChannelStats.empty(parts.down.in_features)
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


@torch.no_grad()
def capture(
    model,
    windows: TokenWindows,
    batch_size: int = 8,
    progress: bool = True,
    gram_dtype: torch.dtype = torch.float32,
) -> Statistics:
    """One streaming pass over `windows.ids` [N, L]; returns per-block statistics."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    hiddens, kwargs_list = first_block_inputs(model, windows.ids, batch_size)
    blocks = []
    layers = adapter.layers(model)
    for index, block in enumerate(tqdm(layers, desc="capture", disable=not progress, unit="block")):
        t0 = time.perf_counter()
        stats = run_block(block, adapter.parts(block), hiddens, kwargs_list, gram_dtype)
        blocks.append(stats)
        kill_point("CFSP_FAULT_KILL_AFTER_BLOCK", index)
        log.info(
            "capture block %2d: angular %.4f  tokens %d  %.2fs  peak rss %.0f MiB",
            index,
            stats.angular,
            stats.tokens,
            time.perf_counter() - t0,
            peak_rss_mib(),
        )
    return Statistics(blocks, dict(windows.fingerprint), round(time.perf_counter() - start, 3))
