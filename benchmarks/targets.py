"""The benchmark's targets, checked on its rows, and BENCHMARKS.md rendered from its result.

A target is {"target": what is asked, "met": True / False / None (not measured), "numbers"}.
"""

from __future__ import annotations

import os
from pathlib import Path

from cfsp.metrics import render_table

BOOLQ_NOTE = (
    "BoolQ at this scale mostly measures a yes/no bias: about 62% of its validation answers are "
    "'yes', a model that always says 'yes' scores about that, and a pruned model that drifts "
    "towards 'yes' gains points without understanding more. The targets use "
    "the five-task average as specified; the average without BoolQ is shown for reading them."
)


def _by(rows: list[dict], method: str, budget: float) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["budget"] == budget), None)


def _acc(row: dict | None) -> float | None:
    return row["zeroshot"]["average"] if row and row.get("zeroshot") else None


def _target(text: str, met, numbers: str) -> dict:
    return {"target": text, "met": met, "numbers": numbers}


def _lowest_everywhere(rows: list[dict], budgets: list[float]) -> list[dict]:
    ppl_parts, acc_parts, ppl_met, acc_met = [], [], [], []
    for b in budgets:
        here = [r for r in rows if r["budget"] == b and r["method"] != "dense"]
        ours = _by(rows, "default", b)
        others = [r for r in here if r["method"] != "default"]
        if ours is None or not others:
            continue
        best = min(others, key=lambda r: r["ppl"]["wikitext2"])
        mine, theirs = ours["ppl"]["wikitext2"], best["ppl"]["wikitext2"]
        # Equal is lowest too: the default may choose the very plan of another row (control
        # auto picking the uniform allocation is uniform+cfsp, weight for weight).
        ppl_met.append(mine <= theirs)
        same = mine == theirs and ours.get("keep_ratios") == best.get("keep_ratios")
        tie = " (a tie: the same widths in every block)" if same else ""
        ppl_parts.append(f"p={b}: {mine:.2f} vs {best['method']} {theirs:.2f}{tie}")
        scored = [r for r in others if _acc(r) is not None]
        if _acc(ours) is not None and scored:
            top = max(scored, key=_acc)  # the best other method: met if ours is at most 0.5 below
            acc_met.append(_acc(ours) >= _acc(top) - 0.005)
            acc_parts.append(
                f"p={b}: {100 * _acc(ours):.1f} vs best other {top['method']} {100 * _acc(top):.1f}"
            )
    return [
        _target(
            "default has the lowest WikiText-2 perplexity at every budget",
            all(ppl_met) if ppl_met else None,
            "; ".join(ppl_parts) or "not measured",
        ),
        _target(
            "default zero-shot average is the best or within 0.5 points of the best",
            all(acc_met) if acc_met else None,
            "; ".join(acc_parts) or "not measured",
        ),
    ]


# The numeric targets of the benchmark issue were set for SmolLM2-135M ("smollm2"); other models
# are held to the targets that do not depend on the model ("generic": lowest perplexity, best
# accuracy, pruning time).
REPO = Path(__file__).resolve().parent.parent  # recorded relative paths start here
TARGET_MODEL = "smollm2-135m"
TARGET_SETS = ("smollm2", "generic")


def check_targets(rows: list[dict], targets: str = "smollm2") -> list[dict]:
    """Every target of the benchmark issue, met or not, with the numbers behind it."""
    budgets = sorted({r["budget"] for r in rows if r["method"] == "default"})
    out = _lowest_everywhere(rows, budgets)
    out += _model_targets(rows) if targets == "smollm2" else []
    times = [r["time_ratio"] for r in rows if r["method"] == "default"]
    if times:
        out.append(
            _target(
                "pruning time at most 2.0x one dense forward",
                max(times) <= 2.0,
                f"max x{max(times):.2f}",
            )
        )
    return out


def _model_targets(rows: list[dict]) -> list[dict]:
    """The targets set for SmolLM2: perplexity and accuracy ratios, the p=0.5 speed-up."""
    dense = next(r for r in rows if r["method"] == "dense")
    out = []
    at2, at5 = _by(rows, "default", 0.2), _by(rows, "default", 0.5)
    flap5 = _by(rows, "flap+liar", 0.5)
    if at2:
        ratio = at2["ppl"]["wikitext2"] / dense["ppl"]["wikitext2"]
        out.append(_target("p=0.2: perplexity within 1.6x dense", ratio <= 1.6, f"x{ratio:.3f}"))
        if _acc(at2) is not None and _acc(dense) is not None:
            drop = 100 * (_acc(dense) - _acc(at2))
            out.append(
                _target(
                    "p=0.2: zero-shot average within 1.5 points of dense",
                    drop <= 1.5,
                    f"dense {100 * _acc(dense):.1f}, default {100 * _acc(at2):.1f} "
                    f"({-drop:+.1f} points against dense)",
                )
            )
    if at5 and flap5:
        ratio = at5["ppl"]["wikitext2"] / flap5["ppl"]["wikitext2"]
        out.append(
            _target(
                "p=0.5: perplexity at least 30% lower than flap+liar",
                ratio <= 0.7,
                f"{at5['ppl']['wikitext2']:.2f} vs {flap5['ppl']['wikitext2']:.2f} "
                f"({100 * (1 - ratio):.0f}% lower)",
            )
        )
    if at5 and (at5.get("speed_bf16") or {}).get("rounded_speedup"):
        s = at5["speed_bf16"]
        share = s["rounded_speedup"] / s["rounded_ideal"]
        out.append(
            _target(
                "p=0.5, widths rounded to 64: bf16 prefill speed-up at least 0.9x ideal",
                share >= 0.9,
                f"x{s['rounded_speedup']:.3f} of ideal x{s['rounded_ideal']:.3f} "
                f"= {share:.2f} (unrounded: x{s['speedup']:.3f} of x{s['ideal']:.3f})",
            )
        )
    return out


def row_cells(r: dict, round_to: int | str = 64) -> dict:
    """One suite row as the cells of BENCHMARKS.md's table (and the flow's artifact); '-'
    where the suite measured nothing (dense, --no-speed, --no-rounded)."""
    zs = f"{100 * _acc(r):.1f}" if _acc(r) is not None else "-"
    dense = r["method"] == "dense"
    cells = {
        "p": 0 if dense else r["budget"],
        "method": r["method"],
        "removed": 0 if dense else f"{r['achieved']:.4f}",
        "params": f"{r['params']:,}",
        "WikiText-2": f"{r['ppl']['wikitext2']:.2f}",
        "Botchan": f"{r['ppl']['botchan']:.2f}",
        "zero-shot avg": zs,
    }
    rounded = f"rounded to {round_to}: removed, WikiText-2, bf16 (ideal)"
    if dense:
        return {**cells, "time ratio": "-", "bf16 prefill (ideal)": "-", rounded: "-"}
    s, rd = r.get("speed_bf16") or {}, r.get("rounded")
    cells["time ratio"] = f"{r['time_ratio']:.2f}"
    cells["bf16 prefill (ideal)"] = f"x{s['speedup']:.2f} (x{s['ideal']:.2f})" if s else "-"
    cells[rounded] = "-"
    if rd:
        cells[rounded] = f"{rd['achieved']:.4f}, {rd['ppl_wikitext2']:.2f}" + (
            f", x{s['rounded_speedup']:.2f} (x{s['rounded_ideal']:.2f})"
            if "rounded_speedup" in s
            else ""
        )
    return cells


def targets_markdown(targets: list[dict]) -> str:
    """The targets as a markdown table: what is asked, met / NOT met / not measured, numbers."""
    marks = {True: "met", False: "NOT met", None: "not measured"}
    rows = [{"target": t["target"], "result": marks[t["met"]], "numbers": t["numbers"]}
            for t in targets]  # fmt: skip
    return render_table(rows)


def render_markdown(payloads: list[dict], md_dir: Path) -> str:
    """BENCHMARKS.md: one section per model's suite result (the default model first)."""
    ordered = sorted(
        payloads, key=lambda p: (p["settings"]["model"] != TARGET_MODEL, p["settings"]["model"])
    )
    lines = [
        "# Benchmarks",
        "",
        "Every method side by side on one model, one calibration set and one run per model "
        "(`python -m benchmarks.suite --model M`). Defaults were chosen on calibration text and "
        "WikiText-2 *validation* windows, never on these test windows.",
        "",
        *[f"- [{p['settings']['model']}](#{_anchor(p['settings']['model'])})" for p in ordered],
        "",
    ]
    for payload in ordered:
        lines += _section(payload, md_dir)
    return "\n".join(lines + scale_section(md_dir))


SCALE_TABLE = "benchmarks/results/scale.md"  # written by `python -m benchmarks.scale report`


def scale_section(md_dir: Path) -> list[str]:
    """The scale benchmark's table and plot (benchmarks/scale.py), when it has been run."""
    table = md_dir / SCALE_TABLE
    if not table.is_file():
        return []
    return [
        "## Scale",
        "",
        "Random-init checkpoints of public shapes, and the embedded SmolLM2-135M, pruned by "
        "`cfsp prune` (streamed engine, bfloat16, p = 0.3, botchan:train calibration) on a "
        "2-core CPU machine of this workplace, whose CPU the host column names: wall time of "
        "the `cfsp prune` process (start-up and imports "
        "included; `engine ratio`: its passes alone) against one dense forward over the same "
        "calibration tokens in another process, peak RSS of the process tree, bytes of "
        "statistics spilled (`python -m benchmarks.scale measure --shape S`). Run one after the "
        "other on a quiet machine (load ~1.5). Each side of the ratio is the median of up to "
        "three runs while they take under 120 s (prune) / 30 s (forward) in all, one run above: "
        "at SmolLM2 single prunes of one commit took 17.6-21.5 s against forwards of 7.4-8.6 s, "
        "and two medians of three gave 2.50x and 2.17x (the table keeps the later); a single "
        "forward of one shape has varied by up to 45% between sessions on one host. The ratio "
        "depends on the host: the forward is bf16 matrix products, ~2x faster with AMX than "
        "with AVX512-BF16 (0.7 against ~0.4 TFLOP/s), while the refit's float32 Cholesky "
        "solves and the banded Gram do not gain as much, so code of the AMX rows' time (sessions "
        "8-12, before the channel-major 256-channel Gram bands) measured ~3.2x at 7B there and "
        "today's 2.3x on the AVX512-BF16 host.",
        "",
        table.read_text().strip(),
        "",
        "![cost against model size](benchmarks/results/scale.png)",
        "",
    ]


def _anchor(model: str) -> str:
    return "model-" + model.replace(".", "").lower()


def _section(payload: dict, md_dir: Path) -> list[str]:
    """One model's settings, targets, rows, plot and per-task accuracies."""
    st = payload["settings"]
    rows = sorted(payload["rows"], key=lambda r: (r["budget"], r["method"] != "default"))
    speed = (
        "Speed: not measured (--no-speed)."
        if st.get("no_speed") == "True"
        else f"Speed: bf16 prefill tokens/s of batch {st['speed_batch']} x 128 relative to dense, "
        f"median of {st['speed_repeats']} after warm-up, same process; ideal = dense MACs / "
        "pruned MACs."
    )
    rounded = (
        "Rounded: not measured (--no-rounded)."
        if st.get("no_rounded") == "True"
        else f"Rounded: every kept width rounded to a multiple of {st['round_to']}."
    )
    lines = [
        f"## Model {st['model']}",
        "",
        f"Calibration `{st['calib']}` {st['nsamples']} x {st['seqlen']} tokens, seed "
        f"{st['seed']}; one process, statistics captured once and shared by all rows. "
        f"WikiText-2 test perplexity at seqlen 128 over the first {st['wikitext_windows']} "
        f"windows; Botchan over the first {st['botchan_windows']}; zero-shot average of "
        f"{st['tasks'] or 'no tasks'} over the first {st['task_limit']} items each (lm-eval, "
        f"acc{_task_rows(st)}). Time ratio = (capture + pruning + reconstruction) / one dense "
        f"forward pass over the calibration set. {speed} {rounded} {payload['threads']} CPU "
        f"threads; versions {payload['versions']}.",
        "",
        f"Reproduce: `python -m benchmarks.suite{_reproduce_flags(st, md_dir)}` (rows are cached "
        f"in {_link(st['rows'], md_dir)}; a stopped run resumes).",
        "",
        f"### Targets ({st['model']})",
        "",
        targets_markdown(payload["targets"]),
        "",
        f"### All rows ({st['model']})",
        "",
        render_table([row_cells(r, st["round_to"]) for r in rows]),
        "",
        f"![perplexity vs budget, {st['model']}]({_link(st['plot'], md_dir)})",
        "",
    ]
    return lines + _zeroshot_lines(rows)


def _task_methods(st: dict) -> list[str]:
    """--task-methods as recorded (the text of a Python list, or "None"); [] when unset."""
    recorded = st.get("task_methods")
    if not st["tasks"] or recorded in (None, "None"):
        return []
    return [m.strip(" '") for m in recorded.strip("[]").split(",")]


def _task_rows(st: dict) -> str:
    """Which rows have zero-shot columns, when --task-methods limited them."""
    methods = _task_methods(st)
    return f"; dense and {', '.join(methods)} rows only" if methods else ""


def _reproduce_flags(st: dict, md_dir: Path) -> str:
    """The suite's command line for the settings that differ from its defaults."""
    if st["model"] == TARGET_MODEL:
        return ""
    flags = [f"--model {st['model']}", f"--nsamples {st['nsamples']}"]
    flags += [f"--wikitext-windows {st['wikitext_windows']}"]
    flags += [f"--botchan-windows {st['botchan_windows']}", f"--tasks '{st['tasks']}'"]
    if st["tasks"]:
        flags += [f"--task-limit {st['task_limit']}"]
    methods = _task_methods(st)
    if methods:
        flags += [f"--task-methods {' '.join(methods)}"]
    flags += [f"--{k.replace('_', '-')}" for k in ("no_speed", "no_rounded") if st.get(k) == "True"]
    flags += [f"--targets {st['targets']}"] if "targets" in st else []
    paths = {k: _link(st[k], md_dir) for k in ("rows", "out", "plot")}
    flags += [f"--{k} {v}" for k, v in paths.items()]
    return " " + " ".join(flags)


def _link(path: str, md_dir: Path) -> str:
    """A recorded path (relative ones are relative to the repository root) as seen from the
    markdown file's folder."""
    return os.path.relpath(REPO / path, md_dir)


def _zeroshot_lines(rows: list[dict]) -> list[str]:
    tasks = [r for r in rows if r.get("zeroshot")]
    if not tasks:
        return []
    names = [k for k in tasks[0]["zeroshot"] if k not in ("average", "key")]
    rest = [n for n in names if n != "boolq"]
    extra = "average without boolq" if "boolq" in names and rest else ""
    table = []
    for r in tasks:
        z = r["zeroshot"]
        row = {"p": r["budget"], "method": r["method"]}
        row.update({n: f"{100 * z[n]:.1f}" for n in names})
        row["average"] = f"{100 * z['average']:.1f}"
        if extra:
            row[extra] = f"{100 * sum(z[n] for n in rest) / len(rest):.1f}"
        table.append(row)
    lines = ["### Zero-shot accuracy per task", "", render_table(table)]
    if extra:
        lines += ["", BOOLQ_NOTE]
    return lines + [""]
