"""IG-LoRA vs uniform LoRA recovery after pruning, in ONE process on the same pruned model.

The dense model is calibrated (C4 sample 128 x 128, seed 0), captured and pruned once (default
method, budget p); each recovery mode then trains LoRA on a copy of that pruned model with the
same text, steps, seed and (within one rank-1 adapter) the same number of trainable parameters,
merges it, and is scored on the same WikiText-2 test and Botchan windows. The training text
(C4 windows drawn with another seed) is disjoint from both evaluation sources.

  python -m benchmarks.recover --budget 0.5 --steps 100 --out benchmarks/results/recover.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from benchmarks.compare import variant_config
from cfsp.config import RecoverConfig
from cfsp.data import calibration_windows, evaluation_windows
from cfsp.engine.allocate import coarse_scores
from cfsp.engine.capture import capture
from cfsp.engine.driver import prune_model
from cfsp.evaluation.perplexity import perplexity
from cfsp.io import write_json
from cfsp.logs import setup_logging
from cfsp.models import count_params, load_model
from cfsp.pruning import library_versions
from cfsp.recover import recover

log = logging.getLogger("recover-bench")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--method", default="cfsp")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--train", default="c4", help="training text spec")
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=256, help="training windows")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--wikitext", default="wikitext2")
    ap.add_argument("--windows", type=int, default=320)
    ap.add_argument("--modes", nargs="+", default=["uniform", "ig"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/recover.json"))
    args = ap.parse_args(argv)
    setup_logging()

    loaded = load_model(args.model)
    dense, tok = loaded.model, loaded.tokenizer
    calib = calibration_windows(args.calib, tok, 128, 128, 0, dense)
    train = calibration_windows(args.train, tok, args.nsamples, 128, args.train_seed, dense)
    evals = {
        "wikitext2": evaluation_windows(args.wikitext, tok, 128, args.windows, dense),
        "botchan": evaluation_windows("botchan", tok, 128, 200, dense),
    }

    def score(model) -> dict:
        return {s: perplexity(model, w, progress=False)["ppl"] for s, w in evals.items()}

    stats = capture(dense, calib, batch_size=8, progress=False)
    dense_ppl = score(dense)
    pruned = copy.deepcopy(dense)
    prune_model(pruned, stats, variant_config(args.method, args.budget), windows=calib)
    importance = coarse_scores(stats.angular()).tolist()
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "versions": library_versions(),
        "train_text": train.fingerprint,
        "evaluation": {s: w.fingerprint for s, w in evals.items()},
        "dense": dense_ppl,
        "pruned": score(pruned),
        "params": count_params(pruned),
        "importance": importance,
        "modes": {},
    }
    log.info("dense %s; pruned %s", dense_ppl, result["pruned"])
    for mode in args.modes:
        cfg = RecoverConfig(
            enabled=True, mode=mode, rank=args.rank, lr=args.lr, steps=args.steps, batch=args.batch
        )
        model = copy.deepcopy(pruned)
        start = time.perf_counter()
        model, record = recover(model, train.ids, importance, cfg)
        wall = time.perf_counter() - start
        row = {
            "ranks": record["ranks"],
            "trainable_params": record["trainable_params"],
            "loss_first10": sum(record["losses"][:10]) / 10,
            "loss_last10": sum(record["losses"][-10:]) / 10,
            "wall_s": round(wall, 1),
            "ppl": score(model),
        }
        result["modes"][mode] = row
        log.info("%s: %s", mode, {k: v for k, v in row.items() if k != "ranks"})
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
