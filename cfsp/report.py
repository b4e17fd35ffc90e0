"""Markdown and HTML reports, per run and per sweep, with the plots people look at first.

A run summary (`run_summary`, written as runs/<name>/summary.json) holds: name, model, budget,
method, metrics (the flat schema of cfsp.metrics), ppl and dense_ppl ({source: value}),
keep_ratios, and where its artifacts are.
Sweep report files: report.md, report.html, ppl_vs_budget.png, keep_ratios.png, tradeoff.png,
and sweeps.json (every sweep's runs and protocol: the report accumulates, cfsp.report_sweeps).
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from cfsp import __version__
from cfsp.io import atomic_file, read_json
from cfsp.metrics import flatten, render_table
from cfsp.plots import keep_ratio_plot, ppl_vs_budget_plot, tradeoff_plot
from cfsp.report_sweeps import HISTORY, latest_runs, protocol_section, record_sweep

PLOTS = ("ppl_vs_budget.png", "keep_ratios.png", "tradeoff.png")
CSS = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
CSS += "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"


def _ratio_cell(metrics: dict, figure: str, tag: str) -> str:
    """`xS (ideal xI)` for a measured speed-up, `-` when it was not measured."""
    speed = metrics.get(f"speed/{figure}_{tag}")
    if speed is None:
        return "-"
    return f"x{speed:.2f} (ideal x{metrics[f'speed/ideal_{tag}']:.2f})"


def _ppl_cell(summary: dict, source: str) -> str:
    if source not in summary["ppl"]:  # a run of an earlier sweep evaluated on other text
        return "-"
    dense, ours = summary["dense_ppl"][source], summary["ppl"][source]
    return f"{dense:.2f} -> {ours:.2f} (x{ours / dense:.2f})"


def result_row(summary: dict, sources: list[str]) -> dict:
    """One run as table cells: removed fraction, size, perplexity, accuracy, speed, memory."""
    m = summary["metrics"]
    removed = m.get("params/removed_fraction")
    zero, memory = m.get("zeroshot/average"), m.get("speed/memory_fp32")
    row = {
        "run": summary["name"],
        "removed": "-" if removed is None else f"{removed:.4f}",
        "params": f"x{m['params/kept_fraction']:.3f}",
    }
    row.update({f"ppl {s}": _ppl_cell(summary, s) for s in sources})
    row["zero-shot avg"] = "-" if zero is None else f"{zero:.3f}"
    row["prefill fp32"] = _ratio_cell(m, "prefill", "fp32")
    row["prefill bf16"] = _ratio_cell(m, "prefill", "bf16")
    row["memory"] = "-" if memory is None else f"x{memory:.3f}"
    return row


def results_table(summaries: list[dict]) -> str:
    """One row per run: size, perplexity per source (dense -> pruned, ratio), accuracy, speed."""
    sources = list(summaries[0]["ppl"])
    return render_table([result_row(s, sources) for s in summaries])


def _tradeoff_rows(summaries: list[dict]) -> tuple[list[dict], str, str]:
    """Measured fp32 prefill speed-up when every run has it, else the parameter reduction."""
    source = next(iter(summaries[0]["ppl"]))
    measured = all("speed/prefill_fp32" in s["metrics"] for s in summaries)
    rows = []
    for s in summaries:
        m = s["metrics"]
        x = m["speed/prefill_fp32"] if measured else 1 / m["params/kept_fraction"]
        rows.append({"name": s["name"], "x": x, "y": s["ppl"][source] / s["dense_ppl"][source]})
    xlabel = "prefill speed-up, fp32 (measured)" if measured else "dense params / pruned params"
    return rows, xlabel, f"perplexity ratio on {source}"


def write_plots(summaries: list[dict], folder: Path) -> list[Path]:
    """The three sweep plots into `folder`."""
    rows = [{"method": s["method"], "budget": s["budget"], "ppl": s["ppl"]} for s in summaries]
    trade, xlabel, ylabel = _tradeoff_rows(summaries)
    return [
        ppl_vs_budget_plot(rows, summaries[0]["dense_ppl"], folder / PLOTS[0]),
        keep_ratio_plot(summaries, folder / PLOTS[1]),
        tradeoff_plot(trade, xlabel, ylabel, folder / PLOTS[2]),
    ]


def render(title: str, body: str, folder: Path) -> list[Path]:
    """Write `body` (markdown) as report.md and report.html into `folder`."""
    from markdown_it import MarkdownIt

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"# {title}\n\ncfsp {__version__}, {stamp}\n\n{body}\n"
    html = MarkdownIt("commonmark").enable("table").render(text)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
    page += f"<style>{CSS}</style></head><body>{html}</body></html>\n"
    paths = []
    for name, content in (("report.md", text), ("report.html", page)):
        with atomic_file(folder / name) as tmp:
            Path(tmp).write_text(content)
        paths.append(folder / name)
    return paths


def sweep_report(summaries: list[dict], folder: Path, protocol: dict | None = None) -> list[Path]:
    """The report over every run of every sweep into `folder` (cfsp.report_sweeps): table with
    the sweep each row comes from, perplexity-vs-budget, keep ratios, trade-off, and each sweep's
    protocol (`protocol`: labelled lines from `sweep_protocol`, this sweep's)."""
    folder.mkdir(parents=True, exist_ok=True)
    history = record_sweep(folder, summaries, protocol)
    rows = latest_runs(history)
    current = history[-1]["protocol"].get("evaluation")
    same = [s for n, s in rows if history[n - 1]["protocol"].get("evaluation") == current]
    plots = write_plots(same, folder)
    seqlen = {s.get("seqlen") for _, s in rows} - {None}
    sources = list(dict.fromkeys(src for _, s in rows for src in s["ppl"]))
    body = render_table([{**result_row(s, sources), "sweep": n} for n, s in rows])
    body += "\n\nPerplexity at seqlen " + ", ".join(str(x) for x in sorted(seqlen) or ["?"])
    body += "; speed-ups are dense time / pruned time measured in the same process (median);"
    body += " ideal = dense MACs / pruned MACs; memory = peak (weights + activations) ratio."
    body += " `sweep` numbers the sweep a row comes from (see Protocol).\n\n"
    if len(same) < len(rows):
        body += f"Plots: the {len(same)} runs evaluated like sweep {len(history)}.\n\n"
    body += "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    body += "\n\n" + protocol_section(history)
    title = f"cfsp sweeps: {len(rows)} runs from {len(history)} sweep" + "s" * (len(history) > 1)
    return render(title, body, folder) + plots + [folder / HISTORY]


def run_report(summary: dict, folder: Path) -> list[Path]:
    """One run's report: its row of the table, every metric, and its allocation plot."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"metric": k, "value": v} for k, v in sorted(summary["metrics"].items())]
    body = results_table([summary]) + "\n\n## All metrics\n\n" + render_table(rows)
    body += "\n\n## Allocation\n\n![allocation](allocation.png)\n"
    return render(f"cfsp run {summary['name']}", body, folder)


def allocation_rows(allocation: dict) -> list[dict]:
    """An allocation.json as table rows: block, keep ratio, kept widths."""
    pairs = zip(allocation["keep_ratios"], allocation["widths"], strict=True)
    return [{"block": i, "keep": round(k, 4), **w} for i, (k, w) in enumerate(pairs)]


def run_summary(
    name: str, model: str, budget: float, method: str, records: dict[str, dict], dense: dict
) -> dict:
    """One run's summary from its stage records ({stage: {path, hash, stage_s, info}}, the
    recover record absent when healing is off) and the dense model's evaluate record."""
    alloc_dir, evaluation = Path(records["allocate"]["path"]), records["evaluate"]["info"]
    healed = records.get("recover")
    timings = {stage: record["stage_s"] for stage, record in records.items()}
    timings["capture_pass"] = records["capture"]["info"]["wall_s"]
    metrics = flatten(
        evaluation,
        dense["info"],
        records["reconstruct"]["info"]["achieved_fraction"],
        timings,
        healed["info"] if healed else None,
    )
    checkpoint = (healed or records["reconstruct"])["path"]
    return {
        "name": name,
        "model": model,
        "budget": budget,
        "method": method,
        "checkpoint": checkpoint,
        "metrics": metrics,
        "seqlen": evaluation["seqlen"],
        "dense_ppl": {s: r["ppl"] for s, r in dense["info"]["perplexity"].items()},
        "ppl": {s: r["ppl"] for s, r in evaluation["perplexity"].items()},
        "keep_ratios": read_json(alloc_dir / "allocation.json")["keep_ratios"],
        "allocation_plot": str(alloc_dir / "allocation.png"),
        "recover_losses": healed["info"]["losses"] if healed else [],
        "recover_files": [str(Path(healed["path"]) / "recover_loss.png")] if healed else [],
        "files": [
            str(alloc_dir / "allocation.json"),
            str(alloc_dir / "allocation.png"),
            str(Path(records["reconstruct"]["path"]) / "cfsp_manifest.json"),
            str(Path(records["evaluate"]["path"]) / "metrics.json"),
        ],
    }


def write_run_report(summary: dict, folder: Path) -> list[Path]:
    """The run's report folder: its allocation plot and report; records the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["allocation_plot"], folder / "allocation.png")
    summary["report"] = str(folder / "report.html")
    return run_report(summary, folder) + [folder / "allocation.png"]
