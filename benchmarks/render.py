"""Render a `compare.py` result JSON as the README's markdown tables.

python benchmarks/render.py benchmarks/results/methods_grid.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cfsp.metrics import render_table

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


def _row(r: dict, sources: list[str], budget, method: str, achieved) -> dict:
    row = {"budget": budget, "method": method, "removed": achieved, "params": f"{r['params']:,}"}
    row.update({_short(s): f"{r['ppl'][s]:.2f}" for s in sources})
    row["time / dense forward"] = f"{r['time_ratio']:.2f}" if "time_ratio" in r else ""
    return row


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = {(r["variant"], r["budget"]): r for r in data["rows"]}
    dense = rows[("dense", 0.0)]
    sources = list(dense["ppl"])
    budgets = sorted({r["budget"] for r in data["rows"] if r["variant"] != "dense"})
    table = [_row(dense, sources, 0, "dense", 0)]
    for b in budgets:
        table += [
            _row(rows[(v, b)], sources, b, v, f"{rows[(v, b)]['achieved']:.4f}")
            for v in PRESETS
            if (v, b) in rows
        ]
    print(render_table(table) + "\n")
    for source in sources[:2]:
        print(f"{_short(source)} perplexity (dense {dense['ppl'][source]:.2f}):\n")
        grid = []
        for label, cols in GRID.items():
            row = {"criterion": label}
            for b in budgets:
                for m in ("none", "bias", "liar"):
                    r = rows.get((cols[m], b))
                    row[f"p={b} {m}"] = f"{r['ppl'][source]:.2f}" if r else "-"
            grid.append(row)
        print(render_table(grid) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
