"""The benchmark suite: every method side by side on one model, one calibration set, one run.

The dense model is loaded, calibrated (C4 sample, 128 x 128, seed 0) and captured ONCE; every
(method, budget) prunes a copy from the same statistics and is scored on the same windows:
WikiText-2 test (first 320 windows of 128 tokens), Botchan (first 200), zero-shot accuracy
(piqa, arc_easy, boolq, winogrande, hellaswag, first 200 items each), pruning time as a ratio
to one dense forward pass over the calibration set, and bf16 prefill speed-up vs dense next to
the ideal speed-up (dense MACs / pruned MACs), as pruned and with widths rounded to 64.

Each finished row is saved under --rows (one JSON per row, with the settings it was measured
under), so a stopped suite resumes where it stopped; BENCHMARKS.md, the JSON result and the
perplexity-vs-budget plot are rewritten after every row.

  python -m benchmarks.suite                      # the full suite (hours on 2 CPU cores)
  python -m benchmarks.suite --budgets 0.2 --methods default flap+liar --task-limit 20
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.compare import dense_forward_seconds, variant_config
from benchmarks.targets import REPO, TARGET_SETS, check_targets, render_markdown
from cfsp.config import HELDOUT_WINDOWS, SpeedConfig
from cfsp.data import calibration_windows, evaluation_windows
from cfsp.engine.capture import capture
from cfsp.engine.choose import reads_heldout
from cfsp.engine.driver import prune_model
from cfsp.engine.registry import ERROR_SELECTED
from cfsp.evaluation.perplexity import perplexity
from cfsp.evaluation.speed import macs_per_token, measure
from cfsp.io import read_json, write_json
from cfsp.logs import setup_logging
from cfsp.models import count_params, load_model
from cfsp.plots import ppl_vs_budget_plot
from cfsp.pruning import library_versions

log = logging.getLogger("suite")
HERE = Path(__file__).resolve().parent

METHODS = {  # name in the tables -> method variant (PRESET[+key=value...])
    "default": "cfsp",
    "flap+liar": "flap+reconstruct=liar",
    "flap": "flap",
    # One switch each against the CFSP allocation at its fixed control 0.5 (the default chooses
    # its control per run, cfsp.engine.choose): the rows measure the switch, not the choice.
    "cfsp+bias": "cfsp+reconstruct=bias+control=0.5",
    "cfsp+none": "cfsp+reconstruct=none+control=0.5",
    "cfsp+act_norm": "act_norm+control=0.5",
    "uniform+cfsp": "cfsp+allocation=uniform",
    "wanda_sp": "wanda_sp",
    "magnitude": "magnitude",
    "random": "random",
}
TASKS = ["piqa", "arc_easy", "boolq", "winogrande", "hellaswag"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--heldout", type=int, default=HELDOUT_WINDOWS, help="held-out calibration windows"
    )
    ap.add_argument("--wikitext", default="wikitext2", help="WikiText-2 test spec")
    ap.add_argument("--wikitext-windows", type=int, default=320)
    ap.add_argument("--botchan", default="botchan", help="second perplexity source")
    ap.add_argument("--botchan-windows", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated; '' for none")
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument(
        "--task-methods",
        nargs="+",
        choices=list(METHODS),
        help="zero-shot for the dense model and these methods' rows only (default: every row; "
        "zero-shot is most of a row's time on a large vocabulary)",
    )
    ap.add_argument("--round-to", type=int, default=64, choices=[8, 64, 128])
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument(
        "--targets",
        default="smollm2",
        choices=TARGET_SETS,
        help="smollm2: every target of the benchmark issue (set for SmolLM2-135M); generic: "
        "only those that do not depend on the model",
    )
    ap.add_argument(
        "--no-speed", action="store_true", help="skip the bf16 prefill timings (large vocabularies)"
    )
    ap.add_argument(
        "--no-rounded", action="store_true", help="skip the widths-rounded variant of every row"
    )
    ap.add_argument("--rows", type=Path, default=HERE / "results" / "suite_rows")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "suite.json")
    ap.add_argument("--md", type=Path, default=HERE.parent / "BENCHMARKS.md")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "suite_ppl.png")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="re-check the targets and rewrite BENCHMARKS.md and the plot from --out; no model",
    )
    return ap.parse_args(argv)


def settings_key(args: argparse.Namespace) -> str:
    """Everything a row's numbers depend on besides its method and budget."""
    keep = ("model", "calib", "nsamples", "seqlen", "seed", "wikitext", "wikitext_windows")
    keep += ("botchan", "botchan_windows", "round_to", "speed_batch")
    values = {k: getattr(args, k) for k in keep}
    # The switches count only when on, so rows measured before they existed (with speed and
    # rounded columns) keep their key.
    values.update({k: True for k in ("no_speed", "no_rounded") if getattr(args, k)})
    text = json.dumps(values, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Suite:
    """Shared state of one run: the dense model, its statistics and the evaluation windows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.key = settings_key(args)
        loaded = load_model(args.model)
        self.dense, self.tokenizer = loaded.model, loaded.tokenizer
        self.calib = calibration_windows(
            args.calib,
            self.tokenizer,
            args.nsamples,
            args.seqlen,
            args.seed,
            self.dense,
            args.heldout,
        )
        self.evals = {
            "wikitext2": evaluation_windows(
                args.wikitext, self.tokenizer, 128, args.wikitext_windows, self.dense
            ),
            "botchan": evaluation_windows(
                args.botchan, self.tokenizer, 128, args.botchan_windows, self.dense
            ),
        }
        self.tasks = [t for t in args.tasks.split(",") if t]
        self.speed = SpeedConfig(
            enabled=True,
            batch=args.speed_batch,
            seqlen=128,
            decode_tokens=4,
            repeats=args.speed_repeats,
            dtypes=["bfloat16"],
        )
        self.dense_macs = macs_per_token(self.dense, 128)
        self.forward_s = dense_forward_seconds(self.dense, self.calib.ids, 8)
        self.stats = capture(self.dense, self.calib, batch_size=8, progress=False)
        log.info("dense forward %.1fs, capture %.1fs", self.forward_s, self.stats.wall_s)

    def ppl(self, model) -> dict:
        return {s: perplexity(model, w, progress=False)["ppl"] for s, w in self.evals.items()}

    def zeroshot(self, model) -> dict:
        from cfsp.evaluation.zeroshot import zeroshot

        start = time.perf_counter()
        result = zeroshot(model, self.tokenizer, self.tasks, self.args.task_limit)
        zero = {t: r["acc"] for t, r in result["tasks"].items()}
        zero["average"] = result["average_acc"]
        log.info("zero-shot %.4f in %.0fs", zero["average"], time.perf_counter() - start)
        return zero

    def zeroshot_key(self) -> str:
        return f"{','.join(self.tasks)}:{self.args.task_limit}"

    def dense_row(self) -> dict:
        return {
            "method": "dense",
            "budget": 0.0,
            "params": count_params(self.dense),
            "ppl": self.ppl(self.dense),
        }

    def pruned(self, variant: str, budget: float, round_to: int = 1):
        cfg = variant_config(variant, budget).model_copy(update={"round_to": round_to})
        model = copy.deepcopy(self.dense)
        start = time.perf_counter()
        report = prune_model(model, self.stats, cfg, windows=self.calib)
        return model, report, time.perf_counter() - start

    def row(self, name: str, budget: float) -> dict:
        model, report, prune_s = self.pruned(METHODS[name], budget)
        return {
            "method": name,
            "variant": METHODS[name],
            "budget": budget,
            "achieved": report.achieved_fraction,
            "params": count_params(model),
            "prune_s": round(prune_s, 2),
            "time_ratio": (self.stats.wall_s + prune_s) / self.forward_s,
            "forward_s": round(self.forward_s, 2),
            "capture_s": round(self.stats.wall_s, 2),
            "keep_ratios": [round(k, 4) for k in report.keep_ratios],
            **({"control_choice": report.choice} if report.choice else {}),
            "ppl": self.ppl(model),
            **self.rounded_and_speed(name, budget, model),
        }

    def rounded_and_speed(self, name: str, budget: float, model) -> dict:
        """The widths-rounded variant's perplexity and the bf16 prefill speed-ups (None when the
        suite runs with --no-rounded / --no-speed)."""
        out = {"rounded": None, "speed_bf16": None}
        rounded = None
        if not self.args.no_rounded:
            rounded, rounded_report, _ = self.pruned(METHODS[name], budget, self.args.round_to)
            out["rounded"] = {
                "achieved": rounded_report.achieved_fraction,
                "ppl_wikitext2": perplexity(rounded, self.evals["wikitext2"], progress=False)[
                    "ppl"
                ],
            }
        if self.args.no_speed:
            return out
        models = {"dense": self.dense, "pruned": model, **({"rounded": rounded} if rounded else {})}
        bf16 = measure(models, self.speed)["bfloat16"]
        speed = {
            "speedup": bf16["pruned"]["prefill_tok_s"] / bf16["dense"]["prefill_tok_s"],
            "ideal": self.dense_macs / macs_per_token(model, 128),
            "figures": bf16,
        }
        if rounded is not None:
            speed["rounded_speedup"] = (
                bf16["rounded"]["prefill_tok_s"] / bf16["dense"]["prefill_tok_s"]
            )
            speed["rounded_ideal"] = self.dense_macs / macs_per_token(rounded, 128)
        out["speed_bf16"] = speed
        return out


def result_config(cfg, heldout: int = HELDOUT_WINDOWS) -> dict:
    """The fields of a method's config that its result depends on: what a saved row is keyed on,
    so a changed default redoes the rows that read it and only those (the CFSP allocation's
    temperature, control and floor; the CFSP criterion's exponent; the reconstruction's damping
    and statistics (damping only for LIAR or an error-selected criterion); the seed of `random`;
    the held-out windows, for the rows that choose their control on them)."""
    fields = json.loads(cfg.model_dump_json())
    if reads_heldout(cfg):
        fields["heldout"] = heldout
    unread = set()
    if cfg.allocation != "cfsp":
        unread |= {"temperature", "control", "floor"}
    if cfg.criterion != "cfsp":
        unread.add("exponent")
    if cfg.reconstruct == "none":
        unread.add("stats")
    if cfg.reconstruct in ("none", "bias") and cfg.criterion not in ERROR_SELECTED:
        unread.add("damping")  # only the least-squares refit and error-aware selection read it
    if cfg.criterion != "random":
        unread.add("seed")
    return {k: v for k, v in fields.items() if k not in unread}


def _saved(path: Path, key: str, config: dict | None = None) -> dict | None:
    """The row saved at `path` if it was measured under the same settings and, for a pruned
    row, the same resolved method config (a changed default invalidates the rows it touches)."""
    if path.is_file():
        row = read_json(path)
        if row.get("settings") == key and row.get("config") == config:
            return row
    return None


def _cached(path: Path, key: str, compute, config: dict | None = None) -> dict:
    """The row saved at `path` (see `_saved`), else compute it and save it."""
    row = _saved(path, key, config)
    if row is None:
        row = {**compute(), "settings": key, "config": config, "zeroshot": None}
        write_json(path, row)
    return row


def _with_zeroshot(path: Path, row: dict, suite: Suite, model_fn) -> dict:
    """Add zero-shot accuracy to a cached row unless it has it for the same tasks and limit.

    Kept apart from the rest of the row so a suite can first run without tasks (minutes per
    row) and gain zero-shot columns in a later, resumable run."""
    if not suite.tasks or (row.get("zeroshot") or {}).get("key") == suite.zeroshot_key():
        return row
    row = {**row, "zeroshot": {**suite.zeroshot(model_fn()), "key": suite.zeroshot_key()}}
    write_json(path, row)
    return row


def _portable(value) -> str:
    """A setting as text; a path inside this repository relative to its root, so that the
    committed result renders the same links from any checkout (benchmarks.targets)."""
    if isinstance(value, Path) and value.resolve().is_relative_to(REPO):
        return str(value.resolve().relative_to(REPO))
    return str(value)


def write_outputs(args, suite: Suite, rows: list[dict]) -> None:
    payload = {
        "settings": {k: _portable(v) for k, v in vars(args).items()},
        "settings_key": suite.key,
        # This process's own timings; a cached row was timed by the process that computed it
        # (its time_ratio, forward_s and capture_s).
        "last_process": {"dense_forward_s": suite.forward_s, "capture_s": suite.stats.wall_s},
        "calibration": suite.calib.fingerprint,
        "evaluation": {s: w.fingerprint for s, w in suite.evals.items()},
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "rows": rows,
    }
    _publish(args, payload)


def _publish(args: argparse.Namespace, payload: dict) -> None:
    """Check the targets on the payload's rows; write the JSON, the plot and BENCHMARKS.md
    (one section per model: every `*suite.json` beside --out)."""
    rows = payload["rows"]
    payload["targets"] = check_targets(rows, args.targets)
    write_json(args.out, payload)
    dense = next(r for r in rows if r["method"] == "dense")
    pruned = [r for r in rows if r["method"] != "dense"]
    if pruned:
        ppl_vs_budget_plot(pruned, dense["ppl"], args.plot)
    payloads = [payload] + [
        read_json(p) for p in sorted(args.out.parent.glob("*suite.json")) if p != args.out
    ]
    args.md.write_text(render_markdown(payloads, args.md.parent))


def render_only(args: argparse.Namespace) -> list[dict]:
    """Rewrite the targets, BENCHMARKS.md and the plot from a finished JSON result."""
    payload = read_json(args.out)
    _publish(args, payload)
    return payload["rows"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setup_logging()
    if args.render_only:
        return render_only(args)
    suite = Suite(args)
    args.rows.mkdir(parents=True, exist_ok=True)
    dense_path = args.rows / "dense.json"
    dense = _cached(dense_path, suite.key, suite.dense_row)
    dense = _with_zeroshot(dense_path, dense, suite, lambda: suite.dense)
    plan = {
        (name, budget): (
            args.rows / f"{name}-p{budget}.json",
            result_config(variant_config(METHODS[name], budget), args.heldout),
        )
        for name in args.methods
        for budget in args.budgets
    }
    # Every row already measured under these settings is published from the start, so a run
    # stopped part-way (e.g. while adding zero-shot columns) leaves a complete table behind.
    done = {nb: _saved(path, suite.key, config) for nb, (path, config) in plan.items()}

    def publish() -> list[dict]:
        rows = [dense, *(r for r in done.values() if r)]
        write_outputs(args, suite, rows)
        return rows

    rows = publish()
    for (name, budget), (path, config) in plan.items():
        row = _cached(path, suite.key, lambda n=name, b=budget: suite.row(n, b), config)
        if args.task_methods is None or name in args.task_methods:
            row = _with_zeroshot(
                path, row, suite, lambda n=name, b=budget: suite.pruned(METHODS[n], b)[0]
            )
        done[name, budget] = row
        _log_row(done[name, budget])
        rows = publish()  # after the last row: every planned row, the final outputs
    return rows


def _log_row(r: dict) -> None:
    speed = r["speed_bf16"]
    zeroshot = r["zeroshot"]  # None until measured
    log.info(
        "%s p=%.2f: wikitext2 %.2f botchan %.2f zero-shot %s time x%.2f bf16 %s",
        r["method"],
        r["budget"],
        r["ppl"]["wikitext2"],
        r["ppl"]["botchan"],
        f"{zeroshot['average']:.4f}" if zeroshot else "-",
        r["time_ratio"],
        f"x{speed['speedup']:.2f} of ideal x{speed['ideal']:.2f}" if speed else "-",
    )


if __name__ == "__main__":
    main()
