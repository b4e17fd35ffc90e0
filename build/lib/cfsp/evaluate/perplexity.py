"""Perplexity over non-overlapping windows at an explicit context length.

ppl = exp( sum_w sum_{t=1}^{L-1} -log p(x_{w,t} | x_{w,<t}) / (W * (L - 1)) )
Every window starts fresh (no carried context), so the first token of each window is not
scored; the numbers depend strongly on L, which is therefore always reported.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cfsp.data import TokenWindows


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
    batch = max(1, batch_tokens // seqlen)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for first in tqdm(range(0, count, batch), desc=desc, disable=not progress, unit="batch"):
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
