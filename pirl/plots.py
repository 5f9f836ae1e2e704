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
    metrics: Path,
    path: Path,
    chance: float | None = None,
    random_knn: float | None = None,
    random_retrieval: float | None = None,
) -> Path:
    """Loss (and PIRL's patch and image terms, which share one chance level) per epoch against
    chance and, where measured, kNN top-1 and g's retrieval of its own image's f per epoch
    against the untrained trunk's: a run shows at a glance whether each term learned."""
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r["epoch"]) for r in rows]

    def measured(key: str) -> list[tuple[int, float]]:
        return [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True) if r.get(key)]

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, style, label in (
        ("loss", "o-", "loss"),
        ("patch_loss", "v--", "patch term (g)"),
        ("image_loss", "^--", "image term (f)"),
    ):
        points = measured(key)
        if points:
            ax.plot(*zip(*points, strict=True), style, color="C0", ms=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="C0", ls=":", label=f"loss at chance ({chance:.2f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss", color="C0")
    handles, labels = ax.get_legend_handles_labels()
    right = None
    for key, colour, label, floor, floor_label in (
        ("knn_top1", "C1", "kNN top-1 (k=20)", random_knn, "untrained trunk"),
        ("fg_retrieval", "C2", "g finds own f", random_retrieval, "untrained heads"),
    ):
        points = measured(key)
        if not points:
            continue
        right = right or ax.twinx()
        right.plot(*zip(*points, strict=True), "s-", color=colour, ms=3, label=label)
        if floor is not None:
            right.axhline(floor, color=colour, ls=":", label=f"{floor_label} ({floor:.1f})")
    if right is not None:
        right.set_ylabel("top-1 / retrieval (%)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best", fontsize=7)
    ax.set_title(Path(metrics).parent.name)
    return save_figure(fig, path)
