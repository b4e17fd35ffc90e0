"""Where cfsp computes: the one `--device` resolver and the precision of its statistics math.

Devices: `auto` (cuda:0 when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`. A name
that cannot be honoured here (no CUDA, N out of range, a typo) is a usage error raised before
any work starts. Every command and pipeline stage resolves its `--device` / params `device`
through `resolve_device`.

Precision of the statistics math (Gram sums, covariance, Cholesky solves, fine scores):
float32 on every device. The solves are damped Cholesky (damping x mean diagonal bounds the
condition number, see cfsp.engine.reconstruct), and on SmolLM2-135M float32 and float64 kept the
same heads and channels in every block with the same perplexity to 4e-8 (README, "Devices");
float64 doubled the memory and time of every width^2 step on the CPU. `CFSP_MATH_DTYPE=float64`
brings float64 back for a comparison; the choice made is recorded in the prune report
(`math_dtype`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from cfsp.errors import UsageError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # also params.yaml's `device` (cfsp.config)


def check_device_name(name: str) -> str:
    """`name` if it is a device cfsp understands (auto, cpu, cuda, cuda:N); else a usage error.
    Syntax only: whether this machine has that device is `resolve_device`'s question."""
    if not re.match(DEVICE_PATTERN, name.strip()):
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")
    return name.strip()


def resolve_device(name: str | None) -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`; else a usage error."""
    import torch  # here, not at the top: cfsp.config imports this module for DEVICE_PATTERN

    name = check_device_name(name or "auto")
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here")
    index = int(name[5:]) if ":" in name else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {name}: there are {count} CUDA devices (0..{count - 1})")
    return torch.device("cuda", index)


def math_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype of the statistics math on `device`: float32 everywhere unless CFSP_MATH_DTYPE
    says otherwise (`device` is kept so that a per-device choice stays one place to change)."""
    import torch

    forced = os.environ.get("CFSP_MATH_DTYPE", "").strip()
    if forced:
        if forced not in ("float32", "float64"):
            raise UsageError(f"CFSP_MATH_DTYPE={forced!r}: choose float32 or float64")
        return getattr(torch, forced)
    return torch.float32


def factories_on(device: torch.device | str) -> AbstractContextManager:
    """`with torch.device(device)` (tensor factories default to `device`), entered only when
    `device` is not already the default one: that context intercepts every torch call, not just
    factories (Python overhead per call; ~4% of SmolLM2's bf16 block forwards on the CPU)."""
    import torch

    device = torch.device(device)
    return nullcontext() if device == torch.get_default_device() else device


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on `device` (timings); nothing on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting `device`'s peak allocated memory afresh (CUDA only)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_device_mib(device: torch.device) -> float | None:
    """Peak memory allocated on `device` since the last reset, MiB; None on the CPU."""
    if device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


HEAP_MMAP_THRESHOLD = 64 << 20  # bytes; buffers from this size on are mapped and unmapped


@functools.cache  # find_library runs `ldconfig -p`: ~4 ms a call, once per block otherwise
def _glibc():
    """The C library when it is glibc on Linux (mallopt / malloc_trim), else None."""
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


def bound_host_heap() -> bool:
    """Fix glibc's mmap threshold at 64 MiB: activation temporaries below it are reused from
    the heap, buffers above it (weights, Grams, a block's kept rows) are mapped and returned.

    glibc raises its threshold after each large free, so how a buffer is served drifts during a
    run. A low fixed threshold (1 MiB, the previous choice) kept RSS flat but made every
    activation temporary a fresh mapping: its page faults made the block forwards ~1.6x slower
    than a plain forward (RMSNorm 4.7x) on the Llama-3.2-3B shape. The heap's fragments are
    handed back once per block instead (`trim_host_heap`). Returns whether it was set.
    """
    libc = _glibc()
    return bool(libc and libc.mallopt(-3, HEAP_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): every field a size_t; fordblks = free heap bytes."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


TRIM_FREE_BYTES = 256 << 20  # trim only when the heap holds at least this much free memory


def heap_free_bytes() -> int | None:
    """Bytes free inside the heap's arenas (glibc's mallinfo2().fordblks); None without it."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def trim_host_heap(min_free: int = TRIM_FREE_BYTES) -> bool:
    """Return the heap's free pages to the OS (glibc's malloc_trim), once a block is done: RSS
    then follows one block's live buffers, not the depth. Only when the heap holds `min_free`
    bytes or more unused (always when that cannot be read): on SmolLM2 a trim after each block
    (~10 ms, and the page faults of taking the memory back) cost ~1 s of a 20 s prune for no
    RSS. Returns whether it ran."""
    libc = _glibc()
    free = heap_free_bytes()
    if libc is None or (free is not None and free < min_free):
        return False
    return bool(libc.malloc_trim(0) >= 0)
