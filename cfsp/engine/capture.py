"""Capture: one streaming pass over calibration windows collecting every block's statistics.

Per block l: the angular distance between its input and output, and count / sum / Gram of the
inputs of o_proj and down_proj (formulas in `cfsp.engine.statistics`). The pass is the block
loop of `cfsp.engine.stream` on the dense model; nothing is changed.
"""

from __future__ import annotations

import logging
import resource
import time

import torch
from tqdm.auto import tqdm

from cfsp.data import TokenWindows
from cfsp.engine.statistics import Statistics
from cfsp.engine.stream import BlockStream
from cfsp.engine.target import Target, target_of
from cfsp.faults import kill_point

log = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def capture(
    model_or_target,
    windows: TokenWindows,
    batch_size: int = 8,
    progress: bool = True,
    gram_dtype: torch.dtype = torch.float32,
) -> Statistics:
    """One streaming pass over `windows.ids` [N, L]; returns per-block statistics.

    `model_or_target`: the model, or its `Target` when the caller resolved it already.
    """
    start = time.perf_counter()
    target: Target = target_of(model_or_target)
    stream = BlockStream(target, windows.ids, batch_size, gram_dtype)
    blocks = []
    t0 = time.perf_counter()
    walk = tqdm(  # disable=None: the bar is drawn only when stderr is a terminal
        stream.walk(),
        desc="capture",
        total=len(target.layers),
        disable=None if progress else True,
        unit="block",
    )
    for index, _block, stats in walk:
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
        t0 = time.perf_counter()
    return Statistics(blocks, dict(windows.fingerprint), round(time.perf_counter() - start, 3))
