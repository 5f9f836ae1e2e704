"""PNG figures every run folder ends with, and the one way figures are written to disk."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write fig as a PNG (creating its folder) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_learning_curve(
    metrics: Path, path: Path, chance: float | None = None, random_knn: float | None = None
) -> Path:
    """Loss per epoch against its chance level and, where measured, kNN top-1 per epoch against
    the untrained trunk's: a run shows at a glance whether it learned."""
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(epochs, [float(r["loss"]) for r in rows], "o-", color="C0", label="loss")
    if chance is not None:
        ax.axhline(chance, color="C0", ls=":", label=f"loss at chance ({chance:.2f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss", color="C0")
    handles, labels = ax.get_legend_handles_labels()
    knn = [
        (e, float(r["knn_top1"])) for e, r in zip(epochs, rows, strict=True) if r.get("knn_top1")
    ]
    if knn:
        right = ax.twinx()
        right.plot(*zip(*knn, strict=True), "s-", color="C1", label="kNN top-1 (k=20)")
        if random_knn is not None:
            right.axhline(
                random_knn, color="C1", ls=":", label=f"untrained trunk ({random_knn:.1f})"
            )
        right.set_ylabel("kNN top-1 (%)", color="C1")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(Path(metrics).parent.name)
    return save_figure(fig, path)
