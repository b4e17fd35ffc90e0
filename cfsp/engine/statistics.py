"""Calibration statistics: what capture collects and every later step reads.

For the input X [T, n] of o_proj (n = heads * head_dim) and of down_proj (n = FFN width):
  count T, sum_j X_tj, and the Gram matrix G = X^T X [n, n], accumulated on the activations'
  device in `cfsp.devices.math_dtype` (float32 unless CFSP_MATH_DTYPE=float64).
  mean mu = sum / T;  ||X_j||^2 = G_jj;  var_j = G_jj / T - mu_j^2;  C = G / T - mu mu^T.
For block l with input h_l and output h_{l+1} [N, L, d] (residual included):
  angular_l = mean_t arccos(cos(h_{l,t}, h_{l+1,t})) / pi      (a zero vector: 0.5)
`Statistics` saves to / loads from one safetensors file (tensors + JSON metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from cfsp.devices import math_dtype
from cfsp.errors import CfspError
from cfsp.io import atomic_file, save_safetensors

NON_FINITE = (
    "non-finite activations during calibration (NaN/inf): the model or "
    "its dtype overflows on this text; try --dtype float32"
)


def finite_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., n] activations as [T, n] in `dtype`; a NaN/inf stops the calibration at once."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    if not torch.isfinite(x).all():
        raise CfspError(NON_FINITE)
    return x


def channel_sums(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(T, sum_t x_tj [n], sum_t x_tj^2 [n]) of activations [..., n], over this batch in
    float32 (the sum in `math_dtype`, as ChannelStats.add takes it), returned in float64 (the
    running sums across batches). A NaN/inf anywhere makes its channel's sum non-finite, so the
    [n] sums are checked instead of the [T, n] rows (one pass over the batch; also catches a
    float32 overflow of the squares, |x| > 1e19)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    total = rows.sum(0, dtype=math_dtype(rows.device))
    squares = (rows * rows).sum(0)
    if not (torch.isfinite(total).all() and torch.isfinite(squares).all()):
        raise CfspError(NON_FINITE)
    return rows.shape[0], total.double(), squares.double()


def symmetric_product(cols: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """X^T X [n, n] from the activations stored channel-major, cols = X^T [n, T] (contiguous),
    from its upper-triangle bands only, mirrored: k bands of ~`tile` channels cost (k + 1) / 2k
    of the full product (a symmetric rank-T update, which torch does not offer), and the result
    is exactly symmetric. Each band is F.linear(cols[lo:hi], cols[lo:]), the forward's own GEMM
    layout (both operands contiguous along T). In bfloat16 on a 2-core AVX512-BF16 CPU at 8192
    tokens, one full GEMM -> 256-channel bands: n = 1536 92 -> 53 ms, 5632 1.32 s -> 0.69 s,
    11008 (X^T X on a transposed view: 3.55 s) 2.55 s; 1408-channel bands sat in between
    (91 ms, 0.87 s, 3.06 s). One GEMM when n < 1.5 tiles."""
    n = cols.shape[0]
    bands = max(1, round(n / tile))
    if bands == 1:
        return F.linear(cols, cols)
    edges = [n * i // bands for i in range(bands + 1)]
    out = torch.empty(n, n, dtype=cols.dtype, device=cols.device)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = F.linear(cols[lo:hi], cols[lo:])  # [hi - lo, n - lo]
        out[lo:hi, lo:] = band
        out[hi:, lo:hi] = band[:, hi - lo :].T
    return out


@dataclass
class ChannelStats:
    """Running moments of one module's input channels: count T, sum [n], Gram X^T X [n, n]."""

    count: int
    sum: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def empty(cls, n: int) -> ChannelStats:
        """Zeros on the current default device (the block loop sets it to the block's), in
        that device's `math_dtype`."""
        dtype = math_dtype()
        return cls(0, torch.zeros(n, dtype=dtype), torch.zeros(n, n, dtype=dtype))

    def add(self, x: torch.Tensor, gram_dtype: torch.dtype = torch.float32) -> None:
        x = finite_rows(x, gram_dtype)  # [T, n]
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=self.sum.dtype)
        self.gram += (x.T @ x).to(self.gram.dtype)

    def to(self, device: torch.device, dtype: torch.dtype):
        """The same statistics with every tensor on `device` in `dtype` (self if already)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device=device, dtype=dtype)
        return replace(self, **moved)

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
        return centered(self.gram, self.count, self.mean, self.mean)


def centered(second: torch.Tensor, count, mean_a: torch.Tensor, mean_b: torch.Tensor):
    """second / count - mean_a mean_b^T: a (cross-)covariance from summed products, as one
    [a, b] result with no temporaries of that size."""
    return torch.addr(second, mean_a, mean_b, beta=1 / count, alpha=-1)


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
                tensors[f"{i}.{name}.sum"] = st.sum.cpu()
                tensors[f"{i}.{name}.gram"] = st.gram.cpu()
            meta["blocks"].append(
                {
                    "angular": b.angular,
                    "tokens": b.tokens,
                    "o_count": b.o.count,
                    "down_count": b.down.count,
                }
            )
        with atomic_file(path) as tmp:
            save_safetensors(tensors, str(tmp), metadata={"cfsp": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> Statistics:
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


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """arccos(cos(h_in, h_out)) / pi per token, zero vectors as 0.5. [B, L], float64

    As 2 atan2(|u - v|, |u + v|) of the unit vectors u, v: exact to float32 rounding at every
    angle (arccos of a float32 cosine loses ~3e-4 rad near cos = 1), so float32 on every device
    (a quarter of the float64 cost; within 3e-8 of the float64 arccos)."""
    a, b = h_in.float(), h_out.float()
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    u, v = a / na.clamp_min(1e-30), b / nb.clamp_min(1e-30)
    apart = torch.linalg.vector_norm(u - v, dim=-1)
    turn = 2 * torch.atan2(apart, torch.linalg.vector_norm(u + v, dim=-1))
    degenerate = ((na == 0) | (nb == 0)).squeeze(-1)
    return torch.where(degenerate, math.pi / 2, turn).double() / math.pi
