"""Ablation table: each technique switched on or off against the default, per budget.

Reads `compare.py` result JSONs made on the same calibration windows and the same evaluation
windows (both checked by their fingerprints, so rows of several runs can be set side by side:
the capture is deterministic for a seed, and the default's row repeats to the digit), and
writes one markdown row per variant: its perplexity on one evaluation source and its change
against the default (`cfsp`) of the same budget, in percent (negative = better).

  python -m benchmarks.ablation benchmarks/results/sequential.json more.json \
      --source file:/path/wikitext2/tokens/valid.txt --out benchmarks/results/ablation.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfsp.errors import UsageError
from cfsp.io import read_json
from cfsp.metrics import render_table

DEFAULT = "cfsp"
WHAT = {  # variant -> what it switches, against the default
    "cfsp+reconstruct=none": "no reconstruction (LIAR off)",
    "cfsp+reconstruct=bias": "bias-only compensation instead of LIAR (FLAP's)",
    "cfsp+allocation=uniform": "uniform budget instead of the CFSP allocation",
    "cfsp+allocation=flap": "FLAP's global threshold instead of the CFSP allocation",
    "cfsp+control=0.5": "flatter CFSP allocation (control 0.5)",
    "cfsp+control=0.25": "flatter CFSP allocation (control 0.25)",
    "cfsp+control=2": "steeper CFSP allocation (control 2)",
    "cfsp+criterion=act_norm": "activation-norm criterion instead of CFSP's",
    "cfsp+criterion=obs": "error-aware (OBS) selection instead of the CFSP criterion",
    "cfsp+criterion=obs+stats=sequential": "error-aware selection + sequential statistics",
    "cfsp+stats=sequential": "sequential statistics (Grams on the pruned prefix, +1 F)",
    "cfsp+stats=target": "dense-target refit (towards the dense stream)",
    "cfsp+structures=ffn+heads": "attention heads pruned too (attention/FFN share)",
    "cfsp+damping=0.001": "ridge damping 0.001 (default 0.01)",
    "cfsp+damping=0.1": "ridge damping 0.1 (default 0.01)",
    "cfsp+exponent=0.25": "criterion exponent 0.25 on ||X_j|| (default 0.5)",
    "cfsp+exponent=1.0": "criterion exponent 1 on ||X_j|| (default 0.5)",
    "cfsp+control=0.5+damping=0.1": "control 0.5 + damping 0.1 (the proposed default)",
    "cfsp+control=0.5+damping=0.1+stats=sequential": "control 0.5 + damping 0.1 + sequential",
}


def load_rows(paths: list[Path], source: str) -> tuple[list[dict], dict]:
    """Every non-dense row of the files, first occurrence of a (variant, budget) kept; refuses
    files whose calibration or `source` evaluation windows differ."""
    rows, seen, first = [], set(), None
    for path in paths:
        result = read_json(path, expect=dict)
        windows = result.get("evaluation", {}).get(source)
        if windows is None:
            raise UsageError(f"{path} was not evaluated on {source!r}")
        key = (result["calibration"]["hash"], windows["hash"])
        if first is None:
            first = {"calibration": result["calibration"], "evaluation": windows, "key": key}
        elif key != first["key"]:
            raise UsageError(
                f"{path} used other calibration or evaluation windows than {paths[0]}: "
                "its rows are not comparable"
            )
        for row in result["rows"]:
            ident = (row["variant"], row["budget"])
            if row["variant"] != "dense" and ident not in seen:
                seen.add(ident)
                rows.append(row)
    return rows, first or {}


def ablation_rows(rows: list[dict], source: str) -> list[dict]:
    """Per budget: the default first, then each variant with its change against it."""
    table = []
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        base = next((r for r in at if r["variant"] == DEFAULT), None)
        if base is None:
            raise UsageError(f"no {DEFAULT!r} row at budget {budget}: nothing to compare with")
        ppl0 = base["ppl"][source]
        table.append(_cells(budget, "default (cfsp + cfsp + LIAR)", DEFAULT, ppl0, ""))
        for r in sorted(at, key=lambda r: r["ppl"][source]):
            if r is not base:
                ppl = r["ppl"][source]
                change = f"{100 * (ppl / ppl0 - 1):+.1f}%"
                table.append(
                    _cells(budget, WHAT.get(r["variant"], r["variant"]), r["variant"], ppl, change)
                )
    return table


def _cells(budget: float, what: str, variant: str, ppl: float, change: str) -> dict:
    return {
        "p": f"{budget:g}",
        "technique": what,
        "variant": f"`{variant}`",
        "ppl": f"{ppl:.2f}",
        "vs default": change,
    }


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--source", required=True, help="the evaluation source to compare on")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args(argv)
    rows, _ = load_rows(args.results, args.source)
    page = render_table(ablation_rows(rows, args.source)) + "\n"
    if args.out is not None:
        args.out.write_text(page)
    print(page, end="")
    return page


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
