"""GPU check: the same prune on CUDA and on the CPU must agree, and a 1.1B shape must fit.

1. Prune SmolLM2-135M (a converted safetensors folder, --model) at p=0.3 with the in-memory
   engine on --device and on the CPU (same calibration windows); the kept heads and channels
   must be equal and the perplexity on Botchan's held-out lines (botchan:test) within 0.5%.
   The CUDA run does its statistics math in float32, the CPU run in float64 (cfsp.devices).
2. Write the TinyLlama-1.1B shape with random weights (benchmarks/scale.py, the tokenizer of
   --model) and prune it on --device: peak device memory, prune time (capture + plan + fold and
   slice) and one dense forward over the same windows, and their ratio.
Exit status 1 when (1) disagrees; the figures go to stdout and OUT/gpu_check.json.

Imports stay within torch, transformers, safetensors and cfsp (which needs pydantic:
benchmarks/gpu_check.sh installs it from bundled wheels where it is missing).
`--quick` shrinks everything (the `tiny` shape, few windows) so the CPU test runs it in seconds.

  python -m benchmarks.gpu_check --model DIR --out OUT [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("gpu_check")
PPL_TOLERANCE = 0.005  # relative


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="converted SmolLM2-135M folder")
    ap.add_argument("--out", type=Path, required=True, help="a folder for checkpoints + JSON")
    ap.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--calib", default="botchan:train")
    ap.add_argument("--eval-data", default="botchan:test")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--limit", type=int, default=64, help="perplexity windows")
    ap.add_argument("--shape", default="tinyllama-1.1b", help="benchmarks.scale shape")
    ap.add_argument("--quick", action="store_true", help="tiny shape, few windows (tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.nsamples, args.seqlen, args.limit = "tiny", 4, 16, 4
    return args


def _timed(fn, device: torch.device):
    """(result, seconds) of fn(), CUDA work included (synchronized on both sides)."""
    from cfsp.devices import synchronize

    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def prune_and_score(args, device: torch.device, name: str) -> dict:
    """The SmolLM2 prune on `device` (into OUT/pruned-NAME) and its checkpoint's perplexity."""
    from cfsp.config import CalibConfig, EvalConfig, PruneConfig
    from cfsp.evaluation.from_spec import evaluate_model
    from cfsp.pruning import prune_to_checkpoint

    out = args.out / f"pruned-{name}"
    calib = CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    prune = PruneConfig(budget=args.budget)
    manifest, seconds = _timed(
        lambda: prune_to_checkpoint(
            str(args.model), calib, prune, out, device=str(device), overwrite=True
        ),
        device,
    )
    cfg = EvalConfig(perplexity=[args.eval_data], seqlen=args.seqlen, limit=args.limit)
    ppl = evaluate_model(str(out), cfg, device=str(device))["perplexity"][args.eval_data]["ppl"]
    return {
        "device": str(device),
        "math_dtype": manifest["prune"].get("compute", {}).get("math_dtype"),
        "prune_s": round(seconds, 2),
        "ppl": ppl,
        "kept": manifest["prune"]["kept"],
    }


def compare(runs: dict[str, dict]) -> dict:
    """Kept indices equal and perplexities within PPL_TOLERANCE (relative) of the CPU's?"""
    a, cpu = runs["device"], runs["cpu"]
    differing = 0
    for block_a, block_c in zip(a["kept"], cpu["kept"], strict=True):
        for key in ("heads", "channels"):
            differing += len(set(block_a[key]) ^ set(block_c[key]))
    rel = abs(a["ppl"] - cpu["ppl"]) / cpu["ppl"]
    return {
        "kept_equal": a["kept"] == cpu["kept"],
        "kept_differing": differing,
        "ppl_relative_diff": rel,
        "ppl_within_tolerance": rel <= PPL_TOLERANCE,
    }


def scale_run(args, device: torch.device) -> dict:
    """Write the random-init `args.shape` checkpoint and prune it on `device`."""
    from benchmarks.compare import dense_forward_seconds
    from benchmarks.scale import write_checkpoint
    from cfsp.config import PruneConfig
    from cfsp.data import calibration_windows
    from cfsp.devices import peak_device_mib, reset_peak_memory
    from cfsp.engine.capture import capture, peak_rss_mib
    from cfsp.engine.driver import prune_model
    from cfsp.models import load_model

    folder = args.out / args.shape
    if not (folder / "config.json").is_file():
        write_checkpoint(args.shape, folder, args.model, "2GB")
    loaded = load_model(str(folder), dtype="float32")
    loaded.model.to(device)
    windows = calibration_windows(
        args.calib, loaded.tokenizer, args.nsamples, args.seqlen, 0, loaded.model
    )
    ids = windows.ids.to(device)
    with torch.no_grad():
        dense_s = _timed(lambda: dense_forward_seconds(loaded.model, ids, 8), device)[1]
    reset_peak_memory(device)
    cfg = PruneConfig(budget=args.budget)

    def prune():
        stats = capture(loaded.model, windows, progress=False)
        return prune_model(loaded.model, stats, cfg, windows=windows)

    report, prune_s = _timed(prune, device)
    return {
        "shape": args.shape,
        "device": str(device),
        "achieved_fraction": round(report.achieved_fraction, 4),
        "prune_s": round(prune_s, 2),
        "dense_forward_s": round(dense_s, 3),
        "prune_over_forward": round(prune_s / max(dense_s, 1e-9), 1),
        "peak_device_mib": peak_device_mib(device),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _print(args, runs: dict, verdict: dict, scale: dict) -> None:
    for row in runs.values():
        print(
            f"smollm2 p={args.budget} on {row['device']} ({row['math_dtype']} math): "
            f"prune {row['prune_s']:.1f}s  ppl {row['ppl']:.4f}"
        )
    print(
        f"kept indices equal: {verdict['kept_equal']} ({verdict['kept_differing']} differ); "
        f"ppl relative diff {100 * verdict['ppl_relative_diff']:.3f}% (limit 0.5%)"
    )
    print(
        f"{scale['shape']} on {scale['device']}: prune {scale['prune_s']:.1f}s, dense forward "
        f"{scale['dense_forward_s']:.2f}s (x{scale['prune_over_forward']}), peak device "
        f"{scale['peak_device_mib']} MiB, peak host RSS {scale['peak_rss_mib']:.0f} MiB"
    )


def run(argv: list[str] | None = None) -> int:
    """The whole check; returns the exit status (0 agree, 1 disagree)."""
    from cfsp.devices import resolve_device
    from cfsp.io import write_json

    args = _args(argv)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = {"device": prune_and_score(args, device, "device")}
    runs["cpu"] = prune_and_score(args, torch.device("cpu"), "cpu")
    verdict = compare(runs)
    scale = scale_run(args, device)
    _print(args, runs, verdict, scale)
    for row in runs.values():
        row.pop("kept")  # in the checkpoints' manifests
    wall = round(time.perf_counter() - start, 1)
    summary = {"runs": runs, "verdict": verdict, "scale": scale, "wall_s": wall}
    write_json(args.out / "gpu_check.json", summary)
    ok = verdict["kept_equal"] and verdict["ppl_within_tolerance"]
    print(f"gpu check {'passed' if ok else 'FAILED'} in {wall:.0f}s")
    return 0 if ok else 1


def main() -> None:
    from cfsp.errors import CfspError, UsageError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sys.exit(run())
    except CfspError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UsageError) else 1)


if __name__ == "__main__":
    main()
