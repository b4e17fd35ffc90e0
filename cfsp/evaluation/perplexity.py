"""Perplexity over non-overlapping windows at an explicit context length.

ppl = exp( sum_w sum_{t=1}^{L-1} -log p(x_{w,t} | x_{w,<t}) / (W * (L - 1)) )
Every window starts fresh (no carried context), so the first token of each window is not
scored; the numbers depend strongly on L, which is therefore always reported.
Memory: a batch's logits are [B, L, V] float32, and the loss needs ~3 copies of that size (the
logits, the shifted slice, the log-softmax), so B is also capped by `LOGITS_BYTES` of logits: at
Gemma 3's V = 262,144 and L = 128, 4096 tokens of logits are 4.3 GB (13 GB at the peak), while
the model itself is 1 GB.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cfsp.data import TokenWindows

LOGITS_BYTES = 512 * 2**20  # float32 logits of one batch, at most (one window always fits)


@torch.no_grad()
def perplexity(
    model,
    windows: TokenWindows,
    batch_tokens: int = 4096,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """Return {ppl, nll, tokens_scored, windows, seqlen, wall_s} for `windows.ids` [W, L]."""
    ids = windows.ids
    count, seqlen = ids.shape
    batch = batch_windows(model, seqlen, batch_tokens)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    starts = range(0, count, batch)
    # disable=None: the bar is drawn only when stderr is a terminal
    for first in tqdm(starts, desc=desc, disable=None if progress else True, unit="batch"):
        chunk = ids[first : first + batch].to(device)
        logits = model(chunk, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
        targets = chunk[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens_scored": total_tokens,
        "windows": count,
        "seqlen": seqlen,
        "wall_s": round(time.perf_counter() - start, 3),
    }


def batch_windows(model, seqlen: int, batch_tokens: int) -> int:
    """Windows per forward: `batch_tokens` tokens, fewer when their float32 logits would exceed
    `LOGITS_BYTES` (large vocabularies), at least one."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    return max(1, min(batch_tokens // seqlen, LOGITS_BYTES // (seqlen * vocab * 4)))
