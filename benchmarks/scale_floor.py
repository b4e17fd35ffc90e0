"""Floor of the exact LIAR engine at a scale shape on this host, per block, in dense forwards.

The two operations every exact LIAR prune does per block besides its forward: the Gram of the
down_proj input (`statistics.symmetric_product`, bf16 bands, T calibration tokens) and the
float32 LIAR fold (`reconstruct.fold`) at the kept width a uniform budget gives. Both run on
random data of the shape's widths (their cost does not depend on the values). The dense forward
per block is read from this host's row of the shape in benchmarks/results/scale.json.

  python -m benchmarks.scale_floor --shape llama-2-7b [--budget 0.3] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.scale import SHAPES
from benchmarks.scale_measure import RESULTS, host_cpu, row_host
from cfsp.engine.reconstruct import fold
from cfsp.engine.statistics import ChannelStats, symmetric_product
from cfsp.io import read_json


def seconds(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (N x L)")
    args = ap.parse_args(argv)
    shape, host = SHAPES[args.shape], host_cpu()
    rows = [r for r in read_json(RESULTS).get("rows", []) if r["shape"] == args.shape]
    row = next((r for r in rows if row_host(r) == host), None)
    if row is None:
        raise SystemExit(f"error: no {args.shape} row for host {host!r} in {RESULTS}")
    d, f = shape.hidden, shape.ffn
    attn = 2 * d * d + 2 * d * d * shape.kv_heads // shape.heads  # q, o + k, v
    kept = int(f * (1 - args.budget * (attn + 3 * d * f) / (3 * d * f)))  # FFN-only budget
    torch.manual_seed(0)
    cols = (torch.randn(f, args.tokens) * torch.rand(f, 1)).bfloat16()  # X^T [n, T]
    gram_s = seconds(lambda: symmetric_product(cols))
    stats = ChannelStats(args.tokens, cols.float().sum(1), symmetric_product(cols).float())
    weight = (torch.randn(d, f) * 0.02).bfloat16()
    keep = torch.randperm(f)[:kept].sort().values
    fold_s = seconds(lambda: fold(weight, None, stats, keep, "liar", 0.1))
    forward_s = row["dense_forward_s"] / shape.layers
    floor = 1 + (gram_s + fold_s) / forward_s
    print(
        f"{args.shape} on {host}, per block: dense forward {forward_s:.2f} s (scale.json), "
        f"Gram {gram_s:.2f} s, LIAR fold {fold_s:.2f} s ({kept} of {f} channels kept)"
    )
    print(
        f"floor {floor:.2f} F; measured engine {row['engine_ratio']} F, wall {row['time_ratio']} F"
    )


if __name__ == "__main__":
    main()
