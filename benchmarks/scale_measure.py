"""What pruning a model of a given shape costs, measured from outside the process.

For one shape: write its random-init checkpoint if missing (benchmarks/scale.py), run
`python -m cfsp.cli prune --model DIR --budget B --nsamples N --dtype D` as a subprocess while
polling the RSS of its process tree (psutil, every 0.2 s) and the size of its scratch folder
(its TMPDIR), then time one dense forward over the same calibration windows in another
subprocess that loads the model as cfsp does (same dtype, same environment, hence the same
thread count). A short prune (a small shape) runs up to 3 times and a short forward too: each
side of the ratio is the median of its runs (`prune_runs`, `_forward`). A row goes to
benchmarks/results/scale.json (replacing the row of the same settings), and the markdown table
(--md) and the cost-vs-size plot are rewritten.

  python -m benchmarks.scale measure --shape tinyllama-1.1b --nsamples 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
GB = 1e9


def add_measure_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--calib", default="botchan:train")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/cfsp/scale")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both subprocesses")
    ap.add_argument(
        "--engine", help="label of the engine measured (default: the one the manifest names)"
    )
    ap.add_argument("--prune-args", default="", help="extra `cfsp prune` options, one string")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--md", type=Path, help="also write the markdown table here")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "scale.png")
    ap.add_argument("--keep-output", action="store_true", help="keep the pruned checkpoint")


def _env(args, scratch: Path) -> dict:
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=str(HERE.parent))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    return env


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walked
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def run_polled(cmd: list[str], env: dict, scratch: Path, log: Path, every: float = 0.2) -> dict:
    """Run `cmd` (its output streamed to `log`, to follow a long run); return its exit code,
    wall time, peak RSS of its process tree (polled) and the peak size of its scratch folder."""
    import psutil

    start = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak_rss = peak_scratch = polls = 0
    while proc.poll() is None:
        rss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                rss += p.memory_info().rss
        except psutil.Error:  # a process ended between listing and reading
            pass
        peak_rss = max(peak_rss, rss)
        if polls % 10 == 0:
            peak_scratch = max(peak_scratch, dir_bytes(scratch))
        polls += 1
        time.sleep(every)
    output = log.read_bytes()[-3000:].decode(errors="replace")
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 2),
        "peak_rss_bytes": peak_rss,
        "scratch_peak_bytes": peak_scratch,
        "output": output,
    }


def prune_runs(cmd: list[str], env: dict, scratch: Path, log: Path, out: Path) -> dict:
    """Run the prune once, or up to 3 times while they take under 120 s in all (the rule of
    the dense forward's runs, `_forward`, scaled to a prune): the row's wall time is their
    median, so a small shape's ratio is not one draw of a shared VM's noise. Peaks are the
    largest of the runs; the engine's timings are the median run's."""
    from cfsp.export import read_manifest

    runs: list[dict] = []
    while not runs or (len(runs) < 3 and projected_total([r["wall_s"] for r in runs]) < 120):
        run = run_polled(cmd, env, scratch, log)
        if run["rc"] != 0:
            raise SystemExit(f"error: prune exited {run['rc']}:\n{run['output']}")
        run["timings_s"] = read_manifest(out).get("timings_s", {})
        runs.append(run)
    middle = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {
        **middle,
        "runs_s": [r["wall_s"] for r in runs],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "scratch_peak_bytes": max(r["scratch_peak_bytes"] for r in runs),
    }


def projected_total(seconds: list[float]) -> float:
    """The wall time of these runs and one more at their mean (the prune's and the forward's
    rule for another run)."""
    return sum(seconds) * (len(seconds) + 1) / len(seconds)


def dense_forward(args, model_dir: Path, env: dict, pruned: Path) -> dict:
    """One dense forward over the calibration windows, timed in a subprocess (see `_forward`),
    which then loads the pruned output and checks its logits are finite."""
    cmd = [sys.executable, "-m", "benchmarks.scale_measure", "forward", "--model", str(model_dir)]
    cmd += ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += ["--dtype", args.dtype, "--pruned", str(pruned)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: dense forward failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward(argv: list[str]) -> None:
    """Child: load like `cfsp prune` (cfsp.models.load_model), build the same windows
    (cfsp.data.calibration_windows), time one forward in batches of 8 (the capture's batch);
    then free it, load the pruned checkpoint the same way and check one window's logits."""
    import torch

    from benchmarks.compare import dense_forward_seconds
    from cfsp.data import calibration_windows
    from cfsp.models import load_model

    ap = argparse.ArgumentParser()
    for name in ("--model", "--calib", "--dtype", "--pruned"):
        ap.add_argument(name, required=True)
    ap.add_argument("--nsamples", type=int, required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    windows = calibration_windows(
        args.calib, loaded.tokenizer, args.nsamples, args.seqlen, 0, loaded.model
    )
    load_s = time.perf_counter() - start
    # A forward of a few seconds varies by tens of percent between runs on a shared VM: up to
    # 3 of them while they take under 30 s in all, and their median (one at the larger shapes).
    times = [dense_forward_seconds(loaded.model, windows.ids, 8)]
    while len(times) < 3 and projected_total(times) < 30:
        times.append(dense_forward_seconds(loaded.model, windows.ids, 8))
    result = {
        "forward_s": round(statistics.median(times), 4),
        "forward_runs_s": [round(t, 4) for t in times],
        "load_s": round(load_s, 2),
        "threads": torch.get_num_threads(),
        "dense_finite": _finite_logits(loaded.model, windows.ids[:1]),
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "peak_device_bytes": None,  # CPU: no device memory
    }
    del loaded  # never two models in memory at once
    pruned = load_model(args.pruned, dtype=args.dtype).model
    result["output_finite"] = _finite_logits(pruned, windows.ids[:1])
    print(json.dumps(result))


def _finite_logits(model, ids) -> bool:
    import torch

    with torch.no_grad():
        return bool(torch.isfinite(model(ids, use_cache=False).logits).all())


def measure(args, writer) -> dict:
    """Measure one shape (see the module docstring); return the row written."""
    from benchmarks.scale import EMBEDDED, SHAPES
    from cfsp.embedded import embedded_checkpoint

    if args.shape not in SHAPES | EMBEDDED:
        choices = ", ".join(SHAPES | EMBEDDED)
        raise SystemExit(f"error: unknown shape {args.shape!r}; choose one of {choices}")
    real = args.shape in EMBEDDED
    model_dir = embedded_checkpoint(args.shape) if real else args.work / args.shape
    if not real and not (model_dir / "model.safetensors.index.json").is_file():
        print(f"writing the {args.shape} checkpoint to {model_dir}", flush=True)
        writer(args.shape, model_dir)
    out, scratch = args.work / f"{args.shape}-pruned", args.work / f"{args.shape}-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = _env(args, scratch)
    cmd = [sys.executable, "-m", "cfsp.cli", "prune", "--model", str(model_dir), "--out", str(out)]
    cmd += ["--budget", str(args.budget), "--nsamples", str(args.nsamples)]
    cmd += ["--seqlen", str(args.seqlen), "--calib", args.calib, "--dtype", args.dtype]
    cmd += ["--overwrite", *args.prune_args.split()]
    machine = _machine()
    print("running:", " ".join(cmd), flush=True)
    run = prune_runs(cmd, env, scratch, args.work / f"{args.shape}-prune.log", out)
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    machine["load_avg_at_forward"] = [round(x, 2) for x in os.getloadavg()]
    forward = dense_forward(args, model_dir, env, out)
    row = _row(args, model_dir, out, run, maxrss, forward, machine)
    if not args.keep_output:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    save_row(args.results, row)
    report(args)
    return row


def _row(args, model_dir, out, run, maxrss, forward, machine) -> dict:
    from benchmarks.scale import EMBEDDED, SHAPES
    from cfsp.export import read_manifest
    from cfsp.pruning import library_versions

    manifest = read_manifest(out)
    recorded = set(manifest.get("files_sha256", {}))
    leftovers = [
        p for p in out.iterdir() if p.name not in recorded and p.name != "cfsp_manifest.json"
    ]
    timings = run["timings_s"]
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {
        "shape": args.shape,
        **asdict((SHAPES | EMBEDDED)[args.shape]),
        "params": forward["params"],
        "weights_bytes": weights,
        "dtype": args.dtype,
        "budget": args.budget,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "engine": args.engine or ("streamed" if "stream" in manifest else "in-memory"),
        "threads": forward["threads"],
        "prune_wall_s": run["wall_s"],
        "prune_runs_s": run["runs_s"],
        "prune_timings_s": timings,
        "engine_s": round(sum(timings.values()), 2),
        "dense_forward_s": forward["forward_s"],
        "dense_forward_runs_s": forward["forward_runs_s"],
        "time_ratio": round(run["wall_s"] / forward["forward_s"], 2),
        "engine_ratio": round(sum(timings.values()) / forward["forward_s"], 2),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "maxrss_bytes": maxrss,
        "rss_over_weights": round(run["peak_rss_bytes"] / weights, 2),
        "peak_device_bytes": forward["peak_device_bytes"],
        "stats_bytes": run["scratch_peak_bytes"] + sum(p.stat().st_size for p in leftovers),
        "achieved_fraction": manifest.get("prune", {}).get("achieved_fraction"),
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "output_shards": len(list(out.glob("model-*-of-*.safetensors"))),
        "output_finite": forward["output_finite"],
        "dense_finite": forward["dense_finite"],
        "machine": machine,
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _machine() -> dict:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "host": host_cpu(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# Rows measured before the host was recorded: sessions whose CPU had AMX (README, "Measured").
OLD_HOST = "x86 with AMX-BF16"
BF16_UNITS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))  # best first


def host_cpu() -> str:
    """The CPU's model name and its bf16 matrix unit. The ratio to a bf16 forward depends on
    it: AMX runs the forward's bf16 products ~2x faster than AVX512-BF16, the float32 solves
    of the refit not at all."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    info: dict[str, str] = {}  # the first core's fields (every core lists the same)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    units = [name for flag, name in BF16_UNITS if flag in flags]
    return f"{info.get('model name', '?')}, {units[0] if units else 'no bf16 unit'}"


def row_host(row: dict) -> str:
    return row.get("machine", {}).get("host", OLD_HOST)


def _key(row: dict) -> tuple:
    keys = ("shape", "dtype", "budget", "nsamples", "seqlen", "engine")
    return (*(row.get(k) for k in keys), row_host(row))


def save_row(path: Path, row: dict) -> None:
    from cfsp.io import read_json, write_json

    rows = read_json(path, expect=dict).get("rows", []) if path.is_file() else []
    rows = [r for r in rows if _key(r) != _key(row)] + [row]
    order = sorted(rows, key=lambda r: (row_host(r), r["engine"], r["params"]))
    write_json(path, {"rows": order})


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| host | engine | shape | params | weights GB | N x L | prune s | dense fwd s | ratio "
        "| engine ratio | peak RSS GB | RSS / weights | peak device GB | stats GB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        device = "" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / GB:.2f}"
        body += (
            f"| {row_host(r)} | {r['engine']} | {r['shape']} | {r['params'] / 1e9:.2f}B "
            f"| {r['weights_bytes'] / GB:.2f} | {r['nsamples']} x {r['seqlen']} "
            f"| {_prune_seconds(r)} | {r['dense_forward_s']:.1f} | {r['time_ratio']:.2f}x "
            f"| {r['engine_ratio']:.2f}x | {r['peak_rss_bytes'] / GB:.2f} "
            f"| {r['rss_over_weights']:.1f}x | {device or 'n/a'} | {r['stats_bytes'] / GB:.2f} |\n"
        )
    return head + body


def _prune_seconds(row: dict) -> str:
    """The prune's wall time; "median of k" when the row took several runs."""
    runs = row.get("prune_runs_s", [])
    if len(runs) > 1:
        return f"{row['prune_wall_s']:.1f} (median of {len(runs)})"
    return f"{row['prune_wall_s']:.0f}"


def report(args) -> None:
    """Rewrite the markdown table (--md, and stdout) and the plot from the results JSON."""
    from cfsp.io import atomic_file, read_json
    from cfsp.plots import scale_plot

    rows = read_json(args.results, expect=dict).get("rows", [])
    table = markdown_table(rows)
    print(table)
    if args.md:
        with atomic_file(args.md) as tmp:
            Path(tmp).write_text(table)
    if rows and args.plot:
        scale_plot([{**r, "series": f"{r['engine']}, {row_host(r)}"} for r in rows], args.plot)


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        _forward(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m benchmarks.scale measure ... (see --help)")
