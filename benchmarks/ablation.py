"""Ablation table: each technique switched on or off against the default, per budget.

Reads `compare.py` result JSONs made on the same calibration windows and the same evaluation
windows (both checked by their fingerprints, so rows of several runs can be set side by side:
the capture is deterministic for a seed, and the default's row repeats to the digit), and
writes one markdown row per variant: its perplexity on one evaluation source, its change
against the default (`cfsp`) of the same budget, in percent (negative = better), and its time
ratio as compare.py measured it ((capture + prune) / one dense forward over the calibration
windows, in F; "-" for rows recorded without it).

  python -m benchmarks.ablation benchmarks/results/sequential.json more.json \
      --source file:/path/wikitext2/tokens/valid.txt --budgets 0.2 0.5 \
      --out benchmarks/results/ablation.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfsp.config import parse_variant
from cfsp.errors import UsageError
from cfsp.io import read_json
from cfsp.metrics import render_table

DEFAULT = "cfsp"
CHOICES = {  # (key, value) of a categorical override -> what it switches, against the default
    ("reconstruct", "none"): "no reconstruction (LIAR off)",
    ("reconstruct", "bias"): "bias-only compensation instead of LIAR (FLAP's)",
    ("allocation", "uniform"): "uniform budget instead of the CFSP allocation",
    ("allocation", "flap"): "FLAP's global threshold instead of the CFSP allocation",
    ("criterion", "act_norm"): "activation-norm criterion instead of CFSP's",
    ("criterion", "obs"): "error-aware (OBS) selection instead of the CFSP criterion",
    ("stats", "sequential"): "sequential statistics (Grams on the pruned prefix, +1 F)",
    ("stats", "target"): "dense-target refit (towards the dense stream)",
    ("structures", "ffn+heads"): "attention heads pruned too (attention/FFN share)",
}
SETTINGS = {  # key of a numeric override -> what it sets
    "control": "CFSP allocation control {}",
    "damping": "ridge damping {}",
    "exponent": "criterion exponent {} on ||X_j||",
}


def describe(variant: str) -> str:
    """What a `cfsp+key=value...` variant changes, one phrase per override."""
    method, overrides = parse_variant(variant)
    if method != DEFAULT or not overrides:
        return variant
    phrases = []
    for key, value in overrides.items():
        if (key, value) in CHOICES:
            phrases.append(CHOICES[key, value])
        elif key in SETTINGS:
            phrases.append(SETTINGS[key].format(value))
        else:
            phrases.append(f"{key}={value}")
    return " + ".join(phrases)


def load_rows(paths: list[Path], source: str) -> list[dict]:
    """Every non-dense row of the files, first occurrence of a (variant, budget) kept; refuses
    files whose calibration or `source` evaluation windows differ."""
    rows, seen, first_key = [], set(), None
    for path in paths:
        result = read_json(path, expect=dict)
        windows = result.get("evaluation", {}).get(source)
        if windows is None:
            raise UsageError(f"{path} was not evaluated on {source!r}")
        key = (result["calibration"]["hash"], windows["hash"])
        if first_key is None:
            first_key = key
        elif key != first_key:
            raise UsageError(
                f"{path} used other calibration or evaluation windows than {paths[0]}: "
                "its rows are not comparable"
            )
        for row in result["rows"]:
            ident = (row["variant"], row["budget"])
            if row["variant"] != "dense" and ident not in seen:
                seen.add(ident)
                rows.append(row)
    return rows


def ablation_rows(rows: list[dict], source: str) -> list[dict]:
    """Per budget: the default first, then each variant with its change against it."""
    table = []
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        base = next((r for r in at if r["variant"] == DEFAULT), None)
        if base is None:
            raise UsageError(f"no {DEFAULT!r} row at budget {budget}: nothing to compare with")
        ppl0 = base["ppl"][source]
        table.append(_cells(budget, "default (cfsp + cfsp + LIAR)", base, source, ""))
        for r in sorted(at, key=lambda r: r["ppl"][source]):
            if r is not base:
                change = f"{100 * (r['ppl'][source] / ppl0 - 1):+.1f}%"
                table.append(_cells(budget, describe(r["variant"]), r, source, change))
    return table


def _cells(budget: float, what: str, row: dict, source: str, change: str) -> dict:
    ratio = row.get("time_ratio")
    return {
        "p": f"{budget:g}",
        "technique": what,
        "variant": f"`{row['variant']}`",
        "ppl": f"{row['ppl'][source]:.2f}",
        "vs default": change,
        "time (F)": "-" if ratio is None else f"{ratio:.2f}",
    }


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--source", required=True, help="the evaluation source to compare on")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    ap.add_argument("--budgets", type=float, nargs="+", help="only these budgets (default: all)")
    args = ap.parse_args(argv)
    rows = load_rows(args.results, args.source)
    if args.budgets:
        rows = [r for r in rows if any(abs(r["budget"] - b) < 1e-9 for b in args.budgets)]
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
