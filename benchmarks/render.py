"""Render a `compare.py` result JSON as the README's markdown tables.

python benchmarks/render.py benchmarks/results/methods_grid.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PRESETS = ["cfsp", "cfsp+structures=ffn", "flap", "wanda_sp", "act_norm", "magnitude", "random"]
GRID = {  # criterion row -> variant per reconstruction column
    "cfsp (cfsp allocation)": {
        "none": "cfsp+reconstruct=none",
        "bias": "cfsp+reconstruct=bias",
        "liar": "cfsp",
    },
    "wanda_sp (uniform)": {
        "none": "wanda_sp",
        "bias": "wanda_sp+reconstruct=bias",
        "liar": "wanda_sp+reconstruct=liar",
    },
    "flap (flap allocation)": {
        "none": "flap+reconstruct=none",
        "bias": "flap",
        "liar": "flap+reconstruct=liar",
    },
}


def _short(source: str) -> str:
    return "wikitext2 valid" if source.endswith("valid.txt") else source


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = {(r["variant"], r["budget"]): r for r in data["rows"]}
    dense = rows[("dense", 0.0)]
    sources = list(dense["ppl"])
    budgets = sorted({r["budget"] for r in data["rows"] if r["variant"] != "dense"})
    print(
        "| budget | method | removed | params | "
        + " | ".join(map(_short, sources))
        + " | time / dense forward |"
    )
    print("|---|---|---|---|" + "---|" * len(sources) + "---|")
    print(
        f"| 0 | dense | 0 | {dense['params']:,} | "
        + " | ".join(f"{dense['ppl'][s]:.2f}" for s in sources)
        + " | |"
    )
    for b in budgets:
        for v in PRESETS:
            r = rows.get((v, b))
            if r:
                print(
                    f"| {b} | {v} | {r['achieved']:.4f} | {r['params']:,} | "
                    + " | ".join(f"{r['ppl'][s]:.2f}" for s in sources)
                    + f" | {r['time_ratio']:.2f} |"
                )
    print()
    for source in sources[:2]:
        print(f"{_short(source)} perplexity (dense {dense['ppl'][source]:.2f}):\n")
        print(
            "| criterion | "
            + " | ".join(f"p={b} {m}" for b in budgets for m in ("none", "bias", "liar"))
            + " |"
        )
        print("|---|" + "---|" * (3 * len(budgets)))
        for label, cols in GRID.items():
            cells = []
            for b in budgets:
                for m in ("none", "bias", "liar"):
                    r = rows.get((cols[m], b))
                    cells.append(f"{r['ppl'][source]:.2f}" if r else "-")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
