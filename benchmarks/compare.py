"""Side-by-side comparison of pruning variants in ONE process with shared statistics.

The dense model is loaded once, calibrated once and captured once; every variant prunes a copy
from the same statistics and is evaluated on the same windows. Variants are
`PRESET[+key=value...]`, e.g. `cfsp`, `cfsp+reconstruct=bias`, `flap+reconstruct=liar`,
`cfsp+structures=ffn`.

  python benchmarks/compare.py --budgets 0.2 0.5 --variants cfsp flap wanda_sp \
      --calib c4 --eval wikitext2:320 --eval botchan:200 --out benchmarks/results/run.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

from cfsp.config import HELDOUT_WINDOWS, PruneConfig, parse_variant, validate
from cfsp.data import calibration_windows, evaluation_windows
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.evaluation.perplexity import perplexity
from cfsp.io import write_json
from cfsp.logs import setup_logging
from cfsp.metrics import render_table
from cfsp.models import count_params, load_model
from cfsp.pruning import library_versions

log = logging.getLogger("compare")


def variant_config(text: str, budget: float) -> PruneConfig:
    method, overrides = parse_variant(text)
    return validate(PruneConfig, {"method": method, "budget": budget, **overrides}, text)


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for first in range(0, ids.shape[0], batch):
        model(ids[first : first + batch], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--variants", nargs="+", default=["cfsp", "flap", "wanda_sp"])
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--heldout", type=int, default=HELDOUT_WINDOWS, help="held-out calibration windows"
    )
    ap.add_argument(
        "--eval",
        action="append",
        default=None,
        help="SOURCE:WINDOWS, repeatable (default wikitext2:320)",
    )
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    setup_logging()
    evals = args.eval or ["wikitext2:320"]

    loaded = load_model(args.model)
    dense = loaded.model
    calib = calibration_windows(
        args.calib, loaded.tokenizer, args.nsamples, args.seqlen, args.seed, dense, args.heldout
    )
    eval_sets = {}
    for item in evals:
        source, _, limit = item.rpartition(":")
        eval_sets[source] = evaluation_windows(
            source, loaded.tokenizer, args.eval_seqlen, int(limit), dense
        )
    forward_s = dense_forward_seconds(dense, calib.ids, 8)
    stats = capture(dense, calib, batch_size=8, progress=False)
    log.info("dense forward over calibration: %.1fs; capture: %.1fs", forward_s, stats.wall_s)

    def evaluate(model) -> dict:
        return {s: perplexity(model, w, progress=False)["ppl"] for s, w in eval_sets.items()}

    rows = [
        {
            "variant": "dense",
            "budget": 0.0,
            "achieved": 0.0,
            "params": count_params(dense),
            "ppl": evaluate(dense),
        }
    ]
    log.info("dense: %s", rows[0]["ppl"])
    for budget in args.budgets:
        for variant in args.variants:
            cfg = variant_config(variant, budget)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = prune_model(model, stats, cfg, windows=calib)
            prune_s = time.perf_counter() - start
            row = {
                "variant": variant,
                "budget": budget,
                "config": cfg.model_dump(),
                "achieved": report.achieved_fraction,
                "params": count_params(model),
                "prune_s": round(prune_s, 2),
                "time_ratio": round((stats.wall_s + prune_s) / forward_s, 3),
                "keep_ratios": [round(k, 4) for k in report.keep_ratios],
                **({"control_choice": report.choice} if report.choice else {}),
                "ppl": evaluate(model),
            }
            rows.append(row)
            log.info(
                "%s @ %.2f: achieved %.4f  ppl %s  time ratio %.2f",
                variant,
                budget,
                row["achieved"],
                {k: round(v, 2) for k, v in row["ppl"].items()},
                row["time_ratio"],
            )
            del model
            write_json(args.out, _payload(args, forward_s, stats, calib, eval_sets, rows))
    print(markdown_table(rows, list(eval_sets)))


def _payload(args, forward_s, stats, calib, eval_sets, rows) -> dict:
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "dense_forward_s": round(forward_s, 3),
        "capture_s": stats.wall_s,
        "calibration": calib.fingerprint,
        "evaluation": {s: w.fingerprint for s, w in eval_sets.items()},
        "versions": library_versions(),
        "rows": rows,
    }


def markdown_table(rows: list[dict], sources: list[str]) -> str:
    cells = []
    for r in rows:
        row = {"budget": f"{r['budget']:.2f}", "variant": r["variant"]}
        row.update(achieved=f"{r['achieved']:.4f}", params=f"{r['params']:,}")
        row.update({f"{s} ppl": f"{r['ppl'][s]:.2f}" for s in sources})
        row["time ratio"] = r.get("time_ratio", "")
        cells.append(row)
    return render_table(cells) + "\n"


if __name__ == "__main__":
    main()
