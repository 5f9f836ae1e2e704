"""PNG figures of the invariance analysis: distance histograms and per-layer curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pirl.invariance import BINS, LayerInvariance
from pirl.plots import save_figure


def plot_histograms(results: Mapping[str, Sequence[LayerInvariance]], path: Path) -> Path:
    """One row per model, one panel per layer: own-transform distances against other images'
    (densities, so 360 own pairs and 130k other pairs share an axis), as in the paper's Fig. 4."""
    cols = max(len(v) for v in results.values())
    fig, axes = plt.subplots(
        len(results),
        cols,
        figsize=(2.6 * cols, 2.2 * len(results)),
        squeeze=False,
        sharex=True,
    )
    width = np.diff(BINS)
    for row, (model, layers) in enumerate(results.items()):
        for col in range(cols):
            ax = axes[row, col]
            if col >= len(layers):
                ax.axis("off")
                continue
            r = layers[col]
            for counts, label, colour in (
                (r.hist_other, "other images", "tab:gray"),
                (r.hist_own, "own transform", "tab:blue"),
            ):
                density = counts / max(counts.sum(), 1) / width
                ax.stairs(density, BINS, fill=True, alpha=0.5, color=colour, label=label)
            ax.set_title(f"{model}: {r.layer}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == len(results) - 1:
                ax.set_xlabel("L2 distance (unit vectors)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Distance of each image to its jigsaw transform vs to other images", fontsize=10)
    return save_figure(fig, path)


def plot_layer_curves(
    table: pd.DataFrame, columns: Sequence[tuple[str, str]], ylabel: str, title: str, path: Path
) -> Path:
    """One line per model over the table's layer order; `columns` are (column, line style label)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    styles = ["-", "--", ":", "-."]
    layers = list(dict.fromkeys(table["layer"]))
    for i, (model, rows) in enumerate(table.groupby("model", sort=False)):
        rows = rows.set_index("layer").reindex(layers)
        for (column, label), style in zip(columns, styles, strict=False):
            ax.plot(
                range(len(layers)),
                rows[column],
                style,
                marker="o",
                color=f"C{i}",
                label=f"{model} {label}".strip(),
            )
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
