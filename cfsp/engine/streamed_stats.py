"""O(width) calibration moments and a time/memory meter for the streamed engine's first pass.

What the allocation needs from a block's statistics is, per input channel j of o_proj and
down_proj, the token count T, sum_t X_tj and sum_t X_tj^2 (the Gram matrix's diagonal): every
fine criterion reads only ||X_j|| and var_j (cfsp.engine.importance), and the coarse allocation
only the angular distance. `ChannelMoments` keeps exactly these, O(width) per module, and offers
the `ChannelStats` interface the criteria read; the full Gram (width^2) is built in the second
pass, one block at a time.

The diagonal is a sum of squares, float32 within a batch and float64 across batches
(`channel_sums`). The in-memory path takes it from a float32 Gram product, so the two agree to
~1e-6 relative, not bit for bit (scores nearer than that could rank differently; the tests
check the kept indices are the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cfsp.devices import factories_on
from cfsp.engine.capture import peak_rss_mib
from cfsp.engine.statistics import BlockStats, ChannelStats, channel_sums
from cfsp.engine.stream import run_block
from cfsp.errors import UsageError


@dataclass
class ChannelMoments(ChannelStats):
    """count, sum [n] and sum of squares [n] of one module's input channels; `gram` is None."""

    sq: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int) -> ChannelMoments:
        """Zeros on the current default device (the caller's `cfsp.devices.factories_on`)."""
        z = torch.zeros(n, dtype=torch.float64)
        return cls(0, z, None, z.clone())

    def add(self, x: torch.Tensor, gram_dtype: torch.dtype = torch.float32) -> None:
        count, total, squares = channel_sums(x)
        self.count += count
        self.sum += total
        self.sq += squares

    def finish(self) -> None:
        """Nothing pending (the Gram-keeping subclass takes its product here)."""

    def moments(self) -> ChannelMoments:
        return self

    @property
    def sq_norm(self) -> torch.Tensor:
        return self.sq.clone()

    @property
    def cov(self) -> torch.Tensor:
        raise UsageError("channel moments hold no covariance (the second pass builds it)")


@torch.no_grad()
def block_moments(
    block, parts, hiddens: list, kwargs_list: list, device, empty=ChannelMoments.empty, empty_o=None
) -> BlockStats:
    """Run one block over every batch (outputs replace inputs): its angular distance and the
    statistics of the down_proj / o_proj inputs made by `empty` / `empty_o` (default: `empty`;
    O(width) moments by default, cfsp.engine.streamed_spill.GramMoments adds the Gram)."""
    with factories_on(device):
        return run_block(block, parts, hiddens, kwargs_list, empty=empty, empty_o=empty_o)


class Meter:
    """Wall time and peak memory: host RSS (the process's peak) and device (CUDA) peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak_device_mib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def snapshot(self, since: float) -> dict:
        row = {
            "seconds": round(time.perf_counter() - since, 3),
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        device = self.peak_device_mib()
        if device is not None:
            row["peak_device_mib"] = device
        return row

    @staticmethod
    def describe(row: dict) -> str:
        text = f"{row['seconds']:.2f}s  peak rss {row['peak_rss_mib']:.0f} MiB"
        if "peak_device_mib" in row:
            text += f"  peak device {row['peak_device_mib']:.0f} MiB"
        return text
