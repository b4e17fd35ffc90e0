"""Plots people would rather look at than read (matplotlib, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

from cfsp.io import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def allocation_plot(
    keep_ratios: list[float], angular: list[float], budget: float, title: str, out: Path
) -> Path:
    """Per-block keep ratio (bars) against the block's mean angular distance (line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    blocks = list(range(len(keep_ratios)))
    ax.bar(blocks, keep_ratios, color="#4C78A8", label="kept fraction of block parameters")
    ax.axhline(
        1 - budget, color="#E45756", ls="--", lw=1, label=f"uniform (1 - p = {1 - budget:.2f})"
    )
    ax.set_xlabel("block")
    ax.set_ylabel("keep ratio")
    ax.set_ylim(0, 1.05)
    twin = ax.twinx()
    twin.plot(
        blocks, angular, color="#F58518", marker="o", ms=3, lw=1.2, label="mean angular distance"
    )
    twin.set_ylabel("angular distance / pi")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, out)


def _save(fig, plt, out: Path) -> Path:
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def ppl_vs_budget_plot(rows: list[dict], dense: dict[str, float], out: Path) -> Path:
    """One panel per text source: perplexity against budget, a line per method, dense dashed.

    rows: {"method", "budget", "ppl": {source: value}}; dense: {source: value}.
    """
    plt = _pyplot()
    sources = list(dense)
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.8), dpi=110)
    axes = [axes] if len(sources) == 1 else list(axes)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, source in zip(axes, sources, strict=True):
        for method in methods:
            points = sorted((r["budget"], r["ppl"][source]) for r in rows if r["method"] == method)
            ax.plot(*zip(*[(0.0, dense[source]), *points], strict=True), marker="o", label=method)
        ax.axhline(dense[source], color="grey", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ticker = plt.matplotlib.ticker
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("budget p (fraction of block parameters removed)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(source, fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, plt, out)


def keep_ratio_plot(rows: list[dict], out: Path) -> Path:
    """Per-block keep ratios of every run, one line each. rows: {"name", "keep_ratios"}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    for row in rows:
        ax.plot(row["keep_ratios"], marker=".", lw=1.2, label=row["name"])
    ax.set_xlabel("block")
    ax.set_ylabel("keep ratio")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Per-block keep ratio", fontsize=10)
    return _save(fig, plt, out)


def tradeoff_plot(rows: list[dict], xlabel: str, ylabel: str, out: Path) -> Path:
    """Speed against quality, one labelled point per run. rows: {"name", "x", "y"}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    ax.scatter([r["x"] for r in rows], [r["y"] for r in rows], color="#4C78A8", zorder=3)
    for r in rows:
        ax.annotate(
            r["name"], (r["x"], r["y"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.scatter([1.0], [1.0], color="grey", marker="s", label="dense", zorder=3)
    ax.margins(0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Speed / quality trade-off (ratios to dense)", fontsize=10)
    return _save(fig, plt, out)


def loss_plot(losses: list[float], title: str, out: Path) -> Path:
    """Training loss per step, with a 10-step running mean."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="#BBBBBB", lw=1, label="loss")
    window = min(10, len(losses))
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(losses))
    ]
    ax.plot(steps, smooth, color="#4C78A8", lw=1.8, label=f"mean of last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("causal-LM loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def scale_plot(rows: list[dict], out: Path) -> Path:
    """Cost of pruning against model size, one line per engine: wall seconds (pruning and one
    dense forward over the same tokens) and peak RSS next to the weights' size, log-log.

    rows: {"engine", "params", "prune_wall_s", "dense_forward_s", "peak_rss_bytes",
    "weights_bytes"} (benchmarks/scale.py), and "series" (default: the engine) naming the line
    a row belongs to (the scale benchmark: engine and host CPU)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    series = [r.get("series", r["engine"]) for r in rows]
    for i, engine in enumerate(dict.fromkeys(series)):
        mine = [r for r, name in zip(rows, series, strict=True) if name == engine]
        mine.sort(key=lambda r: r["params"])
        size = [r["params"] / 1e9 for r in mine]
        color = f"C{i}"  # one colour per series: its prune and forward lines read as a pair
        left.plot(
            size,
            [r["prune_wall_s"] for r in mine],
            marker="o",
            color=color,
            label=f"prune ({engine})",
        )
        left.plot(
            size,
            [r["dense_forward_s"] for r in mine],
            marker="s",
            ls="--",
            color=color,
            label=f"dense forward ({engine})",
        )
        right.plot(
            size,
            [r["peak_rss_bytes"] / 1e9 for r in mine],
            marker="o",
            color=color,
            label=f"peak RSS ({engine})",
        )
    weights = sorted({(r["params"] / 1e9, r["weights_bytes"] / 1e9) for r in rows})
    right.plot(*zip(*weights, strict=True), color="grey", ls=":", marker=".", label="weights")
    for ax, ylabel in ((left, "wall seconds"), (right, "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlapped
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    left.set_title("Pruning time vs one dense forward", fontsize=10)
    right.set_title("Peak host memory", fontsize=10)
    return _save(fig, plt, out)
