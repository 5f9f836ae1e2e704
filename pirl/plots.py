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

    monitored = measured("knn_top1")
    fig, axes = plt.subplots(
        1, 2 if monitored else 1, figsize=(11 if monitored else 6.4, 3.8), sharex=True
    )
    ax = axes[0] if monitored else axes
    for key, style, colour, label in (
        ("loss", "o-", "C0", "loss"),
        ("patch_loss", "v--", "C3", "patch term (g)"),
        ("image_loss", "^--", "C4", "image term (f)"),
    ):
        points = measured(key)
        if points:
            ax.plot(*zip(*points, strict=True), style, color=colour, ms=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", label=f"chance, every term ({chance:.2f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{Path(metrics).parent.name}: loss")
    if monitored:
        right = axes[1]
        right.plot(*zip(*monitored, strict=True), "s-", color="C1", ms=3, label="kNN top-1 (k=20)")
        if random_knn is not None:
            right.axhline(random_knn, color="C1", ls=":", label=f"untrained ({random_knn:.1f})")
        right.set_xlabel("epoch")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_ylabel("kNN top-1 (%)", color="C1")
        handles, labels = right.get_legend_handles_labels()
        retrieval = measured("fg_retrieval")
        if retrieval:  # its own axis: a few percent against kNN's tens
            twin = right.twinx()
            twin.plot(*zip(*retrieval, strict=True), "D-", color="C2", ms=3, label="g finds own f")
            if random_retrieval is not None:
                twin.axhline(
                    random_retrieval,
                    color="C2",
                    ls=":",
                    label=f"untrained ({random_retrieval:.1f})",
                )
            twin.set_ylabel("g retrieves its own image's f (%)", color="C2")
            twin.set_ylim(bottom=0)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        right.legend(handles, labels, loc="best", fontsize=8)
        right.set_title("held-out split: what it learned")
    return save_figure(fig, path)
