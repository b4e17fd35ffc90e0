"""Per-block calibration statistics on disk: what the streamed engine's first pass leaves.

The first pass (cfsp.engine.streamed) runs each dense block once and keeps two things:
  moments.safetensors          every block's O(width) part: angular distance, token count and,
                               per o_proj / down_proj input channel, sum and sum of squares
                               (float64); its metadata also holds the calibration fingerprint
                               and the sha256 of every block file, so its own hash names the
                               whole folder (the pipeline's content hash).
  grams/block-NNNNN.safetensors  one block's Gram matrices X^T X of the o_proj and down_proj
                               inputs (float32, or bfloat16 from bfloat16 activations, plus
                               the sums), written when the block is done; o_proj's sums and
                               squares only when no head can be pruned (structures=ffn).
  targets/block-NNNNN.safetensors  with stats=target instead of the Grams: the dense residual
                               stream after the block's attention (`mid`) and after the block
                               (`out`), [N, L, d] each (cfsp.engine.dense_target), O(T d).
The allocation reads only the first; the second pass reads one block file at a time, so nothing
of size width^2 is held for more than one block, and a sweep over budgets or methods shares one
capture. The Gram is accumulated in float32 (`GramMoments`: one fused addmm per batch, no
float64 copy of a width^2 matrix). A model run in bfloat16 hands bfloat16 activations: the
block's rows are kept (T x n, one block's activations) and X^T X is one bfloat16 GEMM over all T
tokens when the block is done (exact inputs, float32 accumulation inside the GEMM, the [n, n]
result rounded once to bfloat16, ~2e-3 relative, and spilled as it is: half the bytes of
float32). On these CPUs that product is ~3.7x faster than float32 (371 vs 99 GFLOP/s for a 1024
x 5632 batch), and the per-batch float32 products were 40% of the first pass; one GEMM instead
of one per batch also saves the n^2 conversions and additions of every batch. Measured on
SmolLM2-135M in bfloat16, p = 0.3, 64 x 128 botchan:train: WikiText-2 validation perplexity (80
windows) 87.3087 vs 87.3474 with float32 products (kept channels are chosen from the moments, so
they are the same). The second pass reads the Grams back in `cfsp.devices.math_dtype` (float32
unless CFSP_MATH_DTYPE=float64).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from cfsp.devices import math_dtype
from cfsp.engine.statistics import BlockStats, ChannelStats, symmetric_product
from cfsp.engine.streamed_stats import ChannelMoments
from cfsp.errors import CfspError, UsageError
from cfsp.io import atomic_file, save_safetensors

MOMENTS = "moments.safetensors"
GRAMS = "grams"
TARGETS = "targets"
MODULES = ("o", "down")


@dataclass
class GramMoments(ChannelMoments):
    """count, sum [n] and sum of squares [n] (float64) and the Gram [n, n].

    bfloat16 activations are kept (the block's [T, n] rows, one block's worth) and their Gram
    is one bfloat16 GEMM over all T tokens at `finish` (float32 accumulation inside, one
    rounding), kept and spilled in bfloat16 (the rounding already happened; half the bytes);
    float32 ones are added batch by batch into a float32 Gram. `gram` is complete after
    `finish`."""

    pending: list = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> GramMoments:
        """Zeros on the current default device (the caller's `cfsp.devices.factories_on`)."""
        z = torch.zeros(n, dtype=torch.float64)
        return cls(0, z, None, z.clone())

    def add(self, x: torch.Tensor, gram_dtype: torch.dtype = torch.float32) -> None:
        super().add(x, gram_dtype)  # count, sums, squares; refuses NaN/inf
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype == torch.bfloat16:  # exact inputs; the product's rounding: see above
            self.pending.append(rows)
            return
        rows = rows.float()
        if self.gram is None:
            self.gram = rows.T @ rows
        else:
            self.gram.addmm_(rows.T, rows)

    def finish(self) -> None:
        """Take the Gram of the kept bfloat16 rows (one GEMM) and free them."""
        if self.pending:
            cols = torch.cat([rows.T for rows in self.pending], dim=1)  # [n, T], contiguous
            self.pending.clear()
            product = symmetric_product(cols)
            self.gram = product if self.gram is None else self.gram + product.to(self.gram.dtype)
        if self.gram is None:  # no tokens
            self.gram = torch.zeros(self.sum.numel(), self.sum.numel(), device=self.sum.device)

    def moments(self) -> ChannelMoments:
        return ChannelMoments(self.count, self.sum, None, self.sq)


def block_file(folder: Path, index: int) -> Path:
    return Path(folder) / GRAMS / f"block-{index:05d}.safetensors"


def write_block(folder: Path, index: int, stats: BlockStats, digest: bool = True) -> str | None:
    """One block's Gram matrices (float32, or bfloat16 when taken from bfloat16 activations) and
    sums to its own file; a module whose statistics hold no Gram (`ChannelMoments`: o_proj when
    no head can be pruned) writes its sums and squares only. Returns the file's sha256 (hashed
    from the bytes written, not read back), or None without `digest`."""
    path = block_file(folder, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {"angular": stats.angular, "tokens": stats.tokens}
    for name in MODULES:
        st = getattr(stats, name)
        st.finish()
        tensors[f"{name}.sum"] = st.sum.cpu().contiguous()
        if st.gram is None:
            tensors[f"{name}.sq"] = st.sq_norm.cpu().contiguous()
        else:
            tensors[f"{name}.gram"] = st.gram.cpu().contiguous()
        meta[f"{name}_count"] = st.count
    data = save(tensors, metadata={"cfsp": json.dumps(meta)})
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return hashlib.sha256(data).hexdigest() if digest else None


def read_block(
    folder: Path, index: int, digest: str | None = None, device: torch.device | str = "cpu"
) -> BlockStats:
    """One block's statistics on `device` in the math dtype (what cfsp.engine.reconstruct
    solves with; `ChannelMoments` for a module written without its Gram); with `digest`, the
    file must have that sha256."""
    path = block_file(folder, index)
    if not path.is_file():
        raise UsageError(f"{path} does not exist: the capture holds no statistics of block {index}")
    data = path.read_bytes()
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CfspError(f"{path} changed since the capture (its sha256 differs)")
    dtype = math_dtype(device)
    try:
        meta = json.loads(_header_metadata(data)["cfsp"])
        tensors = load(data)
        parts = {name: _module_stats(tensors, meta, name, device, dtype) for name in MODULES}
    except (KeyError, TypeError, ValueError, SafetensorError) as err:
        raise CfspError(f"{path} is not a block statistics file ({_what(err)})") from err
    return BlockStats(float(meta["angular"]), int(meta["tokens"]), parts["o"], parts["down"])


def _module_stats(tensors: dict, meta: dict, name: str, device, dtype) -> ChannelStats:
    count, total = int(meta[f"{name}_count"]), tensors[f"{name}.sum"].to(device, dtype)
    if f"{name}.gram" not in tensors:
        return ChannelMoments(count, total, None, tensors[f"{name}.sq"].to(device, dtype))
    return ChannelStats(count, total, tensors[f"{name}.gram"].to(device, dtype))


def write_targets(folder: Path, index: int, mids: list, outs: list) -> None:
    """One block's dense targets (per-batch [B, L, d] lists, concatenated) to its own file."""
    path = Path(folder) / TARGETS / f"block-{index:05d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mid": torch.cat(mids).cpu().contiguous(), "out": torch.cat(outs).cpu().contiguous()}
    with atomic_file(path) as tmp:
        save_safetensors(tensors, str(tmp))


def read_targets(folder: Path, index: int, batches: list, device) -> tuple[list, list]:
    """One block's dense targets split like `batches` (the pruned stream's [B, L, d] list)."""
    path = Path(folder) / TARGETS / f"block-{index:05d}.safetensors"
    if not path.is_file():
        raise UsageError(f"{path} does not exist: the capture holds no targets of block {index}")
    tensors = load(path.read_bytes())
    sizes = [h.shape[0] for h in batches]
    return tuple([t.to(device) for t in torch.split(tensors[key], sizes)] for key in ("mid", "out"))


def _header_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file held in memory (8-byte length, JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def write_moments(
    folder: Path, blocks: list[BlockStats], fingerprint: dict, wall_s: float, grams: list[str]
) -> None:
    """Every block's O(width) part, and the sha256 of the block files written (`grams`, in
    block order; empty when the capture kept no Gram matrices)."""
    tensors, meta = {}, {"fingerprint": fingerprint, "wall_s": wall_s, "blocks": []}
    for i, b in enumerate(blocks):
        row = {"angular": b.angular, "tokens": b.tokens}
        for name in MODULES:
            st = getattr(b, name)
            tensors[f"{i}.{name}.sum"] = st.sum.cpu().contiguous()
            tensors[f"{i}.{name}.sq"] = st.sq_norm.cpu().contiguous()
            row[f"{name}_count"] = st.count
        meta["blocks"].append(row)
    meta["grams"] = list(grams)
    with atomic_file(Path(folder) / MOMENTS) as tmp:
        save_safetensors(tensors, str(tmp), metadata={"cfsp": json.dumps(meta)})


def read_moments(folder: Path) -> tuple[list[BlockStats], dict]:
    """The O(width) statistics of every block (ChannelMoments) and the file's metadata, from a
    capture folder or its moments file."""
    path = Path(folder)
    path = path / MOMENTS if path.is_dir() else path
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["cfsp"])
            blocks = []
            for i, row in enumerate(meta["blocks"]):
                parts = {
                    name: ChannelMoments(
                        int(row[f"{name}_count"]),
                        handle.get_tensor(f"{i}.{name}.sum"),
                        None,
                        handle.get_tensor(f"{i}.{name}.sq"),
                    )
                    for name in MODULES
                }
                blocks.append(
                    BlockStats(float(row["angular"]), int(row["tokens"]), parts["o"], parts["down"])
                )
    except (KeyError, TypeError, ValueError, SafetensorError) as err:
        raise CfspError(f"{path} is not a moments file ({_what(err)})") from err
    return blocks, meta


def check_grams(folder: Path, meta: dict, blocks: int) -> list[str]:
    """The recorded sha256 of every block file; refuse a capture that has none for some block
    (one captured without Gram matrices) or whose files are missing."""
    recorded = meta.get("grams") or []
    if not isinstance(recorded, list) or len(recorded) != blocks:
        raise CfspError(
            f"{folder} holds Gram matrices of {len(recorded)} blocks, the model has {blocks}; "
            "run the capture stage again"
        )
    for index in range(blocks):
        if not block_file(folder, index).is_file():
            raise CfspError(f"{block_file(folder, index)} is missing; run the capture stage again")
    return recorded


def _what(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r} entry"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
