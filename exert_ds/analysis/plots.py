"""PNG figures of the analyses (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def heatmap(values: dict[str, list[float]], title: str, label: str, path: Path, vmin: float = 0.0, vmax: float = 1.0):
    """Block × role heatmap: `values` role → per block value. Writes `path` (PNG) and returns it."""
    roles = list(values)
    blocks = len(values[roles[0]])
    grid = [[values[role][block] for role in roles] for block in range(blocks)]
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(roles), 2.0 + 0.22 * blocks))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(blocks), [str(b) for b in range(blocks)], fontsize=6 if blocks > 20 else 8)
    ax.set_xlabel("role")
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_lines(
    series: dict[str, dict[str, list[float]]], title: str, ylabel: str, path: Path, log: bool = False
) -> Path:
    """One panel per role, one line per series across blocks: `series` label → role → per block value. `log`: plot
    log10 of the values (on linear axes: a log axis's mathtext tick labels cost seconds per figure)."""
    roles = list(next(iter(series.values())))
    cols = min(4, len(roles))
    rows = math.ceil(len(roles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    for i, role in enumerate(roles):
        ax = axes[i // cols][i % cols]
        for label, by_role in series.items():
            values = [math.log10(v) if v > 0 else math.nan for v in by_role[role]] if log else by_role[role]
            ax.plot(range(len(values)), values, marker=".", linewidth=1, label=label)
        ax.set_title(role, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel(f"log10 {ylabel}" if log else ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for j in range(len(roles), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88, wspace=0.35, hspace=0.45)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
