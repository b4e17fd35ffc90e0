"""Speed and memory of a causal LM, dense vs pruned, measured in the same process.

For a batch of B sequences of L tokens (random ids, fixed seed):
    prefill throughput  = B * L / median_r t_prefill                         [tokens/s]
    decode latency      = median_r (t_decode(n) / n)  one new token per step, KV cache on  [ms]
    MACs per token      = sum_linear in * out  +  sum_blocks 2 * d_attn_l * (L + 1) / 2
                          (weights of every nn.Linear incl. lm_head, plus QK^T and AV at the
                          mean causal context of a length-L prefill; d_attn_l = heads_l * head_dim)
    peak memory         = parameters + buffers + peak live activations of one prefill
                          [MiB] (CPU: live storages under a dispatch mode; CUDA: the
                          allocator's peak during the prefill less the other tensors it holds)
    peak RSS            = the process's peak resident host memory so far [MiB], beside it
On CUDA every timing is bracketed by torch.cuda.synchronize (kernels run asynchronously).
Each timing is a median over `repeats` after `warmup` runs. `compare` interleaves the two models
(dense, pruned, dense, pruned, ...) so drift of the machine hits both alike, and reports every
figure as pruned / dense. Both models are cast to each dtype in turn (fp32, bf16).
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cfsp.arch import adapter_for
from cfsp.config import SpeedConfig
from cfsp.devices import synchronize
from cfsp.engine.capture import peak_rss_mib
from cfsp.models import DTYPES, count_params


def macs_per_token(model: nn.Module, context: int) -> int:
    """Multiply-accumulates per token of a length-`context` prefill (formula in the docstring)."""
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    adapter = adapter_for(model)
    attention = 0
    for block in adapter.layers(model):  # o_proj's inputs: heads_l * head_dim
        attention += 2 * adapter.parts(block).o.in_features * (context + 1) // 2
    return linear + attention


def _ids(model: nn.Module, batch: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (batch, seqlen), generator=gen).to(model.device)


@torch.no_grad()
def _prefill_s(model: nn.Module, ids: torch.Tensor) -> float:
    synchronize(ids.device)
    start = time.perf_counter()
    model(ids, use_cache=False)
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_s_per_token(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    out = model(ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(ids.device)
    return (time.perf_counter() - start) / steps


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak.

    Dispatch modes are thread-local, so tasks running in other threads are not counted; views
    share their base's storage and are counted once; storages of `exclude` (weights) never.
    """

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.seen = exclude, set()
        self.live = self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key = id(storage)
            if key in self.seen or storage.data_ptr() in self.exclude:
                continue
            self.seen.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@torch.no_grad()
def peak_memory_mib(model: nn.Module, ids: torch.Tensor) -> float:
    """Parameters + buffers + the peak of live activations during one prefill, in MiB."""
    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(t.untyped_storage().nbytes() for t in tensors.values())
    if ids.device.type == "cuda":  # the allocator's own peak, less what other tensors hold
        torch.cuda.synchronize(ids.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ids.device)
        before = torch.cuda.memory_allocated(ids.device)
        model(ids, use_cache=False)
        torch.cuda.synchronize(ids.device)
        return (torch.cuda.max_memory_allocated(ids.device) - before + weights) / 2**20
    with _LiveBytes(exclude=set(tensors)) as tracker:
        model(ids, use_cache=False)
    return (weights + tracker.peak) / 2**20


def _static(model: nn.Module, cfg: SpeedConfig) -> dict:
    return {
        "params": count_params(model),
        "macs_per_token": macs_per_token(model, cfg.seqlen),
    }


def _timings(models: dict[str, nn.Module], cfg: SpeedConfig) -> dict[str, dict]:
    """Interleaved warm-up and repeats of prefill and decode for every model; medians."""
    ids = {name: _ids(m, cfg.batch, cfg.seqlen, cfg.seed) for name, m in models.items()}
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for rep in range(cfg.warmup + cfg.repeats):
        for name, model in models.items():
            p = _prefill_s(model, ids[name])
            d = _decode_s_per_token(model, ids[name][:1], cfg.decode_tokens)
            if rep >= cfg.warmup:
                prefill[name].append(p)
                decode[name].append(d)
    out = {}
    for name, model in models.items():
        t_prefill = statistics.median(prefill[name])
        out[name] = {
            "prefill_tok_s": cfg.batch * cfg.seqlen / t_prefill,
            "prefill_ms": 1e3 * t_prefill,
            "decode_ms_per_token": 1e3 * statistics.median(decode[name]),
            "peak_memory_mib": peak_memory_mib(model, ids[name]),
            "peak_rss_mib": round(peak_rss_mib(), 1),  # the process's, host memory
        }
    return out


def measure(models: dict[str, nn.Module], cfg: SpeedConfig) -> dict:
    """{dtype: {name: figures}} for each configured dtype; models are copied, not modified."""
    result = {}
    for dtype in cfg.dtypes:
        cast = {n: copy.deepcopy(m).to(DTYPES[dtype]).eval() for n, m in models.items()}
        figures = _timings(cast, cfg)
        for name, model in cast.items():
            figures[name].update(_static(model, cfg))
        result[dtype] = figures
        del cast
    return result


def compare(dense: nn.Module, pruned: nn.Module, cfg: SpeedConfig) -> dict:
    """Dense and pruned figures per dtype, each pruned figure also as a ratio to dense.

    `speedup` fields are dense time / pruned time (> 1 is faster); `ideal_speedup` is
    dense MACs / pruned MACs, the speed-up a perfectly efficient kernel would give.
    """
    raw = measure({"dense": dense, "pruned": pruned}, cfg)
    device = str(next(pruned.parameters()).device)
    out = {
        "config": cfg.model_dump(),
        "device": device,
        "threads": torch.get_num_threads(),
        "dtypes": {},
    }
    for dtype, figures in raw.items():
        d, p = figures["dense"], figures["pruned"]
        out["dtypes"][dtype] = {
            "dense": d,
            "pruned": p,
            "prefill_speedup": p["prefill_tok_s"] / d["prefill_tok_s"],
            "decode_speedup": d["decode_ms_per_token"] / p["decode_ms_per_token"],
            "ideal_speedup": d["macs_per_token"] / p["macs_per_token"],
            "params_ratio": p["params"] / d["params"],
            "memory_ratio": p["peak_memory_mib"] / d["peak_memory_mib"],
        }
    return out
