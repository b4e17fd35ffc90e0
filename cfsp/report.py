"""Markdown and HTML reports, per run and per sweep, with the plots people look at first.

A run summary (written by the flow as runs/<name>/summary.json) holds: name, model, budget,
method, metrics (flat: ppl_<source>_s<L>[_ratio], acc_*, params_ratio, achieved_fraction,
<speed figure>_<fp32|bf16>), ppl and dense_ppl ({source: value}), keep_ratios.
Sweep report files: report.md, report.html, ppl_vs_budget.png, keep_ratios.png, tradeoff.png.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cfsp import __version__
from cfsp.io import atomic_file
from cfsp.plots import keep_ratio_plot, ppl_vs_budget_plot, tradeoff_plot

PLOTS = ("ppl_vs_budget.png", "keep_ratios.png", "tradeoff.png")
CSS = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
CSS += "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _speed_cell(metrics: dict, tag: str) -> str:
    if f"prefill_speedup_{tag}" not in metrics:
        return "-"
    return (
        f"x{metrics[f'prefill_speedup_{tag}']:.2f} (ideal x{metrics[f'ideal_speedup_{tag}']:.2f})"
    )


def results_table(summaries: list[dict]) -> str:
    """One row per run: size, perplexity per source (dense -> pruned, ratio), accuracy, speed."""
    sources = list(summaries[0]["ppl"])
    head = ["run", "removed", "params"] + [f"ppl {s}" for s in sources]
    head += ["zero-shot avg", "prefill fp32", "prefill bf16", "memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        m = s["metrics"]
        cells = [s["name"], _fmt(m["achieved_fraction"], 4), f"x{m['params_ratio']:.3f}"]
        for src in sources:
            dense, ours = s["dense_ppl"][src], s["ppl"][src]
            cells.append(f"{dense:.2f} -> {ours:.2f} (x{ours / dense:.2f})")
        cells += [_fmt(m.get("acc_average")), _speed_cell(m, "fp32"), _speed_cell(m, "bf16")]
        memory = m.get("memory_ratio_fp32")
        cells.append("-" if memory is None else f"x{memory:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tradeoff_rows(summaries: list[dict]) -> tuple[list[dict], str, str]:
    """Measured fp32 prefill speed-up when every run has it, else the parameter reduction."""
    source = next(iter(summaries[0]["ppl"]))
    measured = all("prefill_speedup_fp32" in s["metrics"] for s in summaries)
    rows = []
    for s in summaries:
        m = s["metrics"]
        x = m["prefill_speedup_fp32"] if measured else 1 / m["params_ratio"]
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


def sweep_report(summaries: list[dict], folder: Path) -> list[Path]:
    """The report over every run of a sweep: table, perplexity-vs-budget, keep ratios, trade-off."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summaries, folder)
    seqlen = {s.get("seqlen") for s in summaries} - {None}
    body = results_table(summaries)
    body += "\n\nPerplexity at seqlen " + ", ".join(str(x) for x in sorted(seqlen) or ["?"])
    body += "; speed-ups are dense time / pruned time measured in the same process (median);"
    body += " ideal = dense MACs / pruned MACs; memory = peak (weights + activations) ratio.\n\n"
    body += "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    return render(f"cfsp sweep: {len(summaries)} runs", body, folder) + plots


def run_report(summary: dict, folder: Path) -> list[Path]:
    """One run's report: its row of the table, every metric, and its allocation plot."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = "\n".join(
        f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in sorted(summary["metrics"].items())
    )
    body = results_table([summary]) + "\n\n## All metrics\n\n| metric | value |\n|---|---|\n"
    body += metrics + "\n\n## Allocation\n\n![allocation](allocation.png)\n"
    return render(f"cfsp run {summary['name']}", body, folder)
