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
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
