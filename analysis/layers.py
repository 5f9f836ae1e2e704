"""The per-layer study of several encoders as one run folder: distance of each image to its
jigsaw transform (f-g heads and every trunk stage) and weighted-kNN top-1 (%) per layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.invariance import STAGES, Runtime, encoder_invariance
from analysis.knn import encoder_knn
from analysis.plots import plot_histograms, plot_layer_curves
from pirl.data import ImageList, embedded_root, list_images
from pirl.engine import RunDir, resolve_device
from pirl.invariance import HEADS, LayerInvariance
from pirl.knn import KS
from pirl.tables import markdown_table
from pirl.weights import load_encoder

# The embedded demo's two models. Jigsaw uses 100 permutation classes rather than 2,000: its
# 1,437 images give too few examples per permutation class to learn 2,000.
EMBEDDED_METHODS: dict[str, dict[str, Any]] = {"pirl": {}, "jigsaw": {"num_permutations": 100}}
EMBEDDED_SIZE = 32


def embedded_checkpoints(device: str, num_workers: int) -> list[tuple[str, str]]:
    """Checkpoints of the embedded pretraining of PIRL and Jigsaw (trained once, cached)."""
    from pirl.pretrain import embedded_checkpoint

    return [
        (method, str(embedded_checkpoint(method, device, num_workers, **extra)))
        for method, extra in EMBEDDED_METHODS.items()
    ]


def _splits(
    root: Path, max_images: int, seed: int
) -> tuple[ImageList, ImageList, ImageList | None]:
    """(images for invariance, kNN index, kNN queries or None for leave-one-out)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, test = list_images(root / "train"), list_images(root / "val")
    else:
        train, test = list_images(root), None
    probe = test if test is not None else train
    if len(probe) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(probe), max_images, replace=False))
        probe = ImageList(
            probe.root,
            [probe.paths[i] for i in keep],
            [probe.labels[i] for i in keep],
            probe.classes,
        )
    return probe, train, test


def _rows(
    model: str, layers: list[LayerInvariance], knn: dict[str, dict[int, float]]
) -> list[dict[str, Any]]:
    rows = []
    for r in layers:
        acc = knn.get(r.layer, {})
        rows.append(
            {
                "model": model,
                "layer": r.layer,
                "dim": r.dim,
                "own_mean": r.mean_own,
                "other_mean": r.mean_other,
                "ratio": r.ratio,
                "self_match": r.self_match,
                **{f"knn_k{k}": acc.get(k, math.nan) for k in KS},
            }
        )
    return rows


def layer_study(
    specs: list[tuple[str, str]],
    data: str | None,
    out: str,
    image_size: int | None,
    max_images: int,
    device: str,
    seed: int,
    batch_size: int,
    num_workers: int,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Invariance and kNN per layer for each (name, spec), written to the run folder `out`;
    without data, the embedded set (and, without specs, its PIRL and Jigsaw pretraining)."""
    run = RunDir(out)
    options = {
        "weights": [f"{name}={spec}" for name, spec in specs],
        "data": data,
        "image_size": image_size,
        "max_images": max_images,
        "device": device,
        "seed": seed,
        "batch_size": batch_size,
        "num_workers": num_workers,
    }
    run.start("analyze invariance", options, resolve_device(device), overwrite=overwrite)
    if data is None:
        root, size = embedded_root(EMBEDDED_SIZE), image_size or EMBEDDED_SIZE
        specs = specs or embedded_checkpoints(device, num_workers)
    else:
        root, size = Path(data), image_size or 224
    images, train, test = _splits(root, max_images, seed)
    labelled = len({label for label in train.labels if label >= 0}) >= 2
    rt = Runtime(device, batch_size, num_workers)
    results, rows = {}, []
    for name, spec in specs:
        encoder = load_encoder(spec, seed=seed)
        layers = encoder_invariance(encoder, images, size, seed, rt)
        knn = {}
        if labelled:
            knn = encoder_knn(
                encoder, train, test, STAGES, size, KS, device, batch_size, num_workers
            )
        results[name] = layers
        rows += _rows(name, layers, knn)
    table = pd.DataFrame(rows)
    table.to_csv(run.path("invariance.csv"), index=False)
    run.path("invariance.md").write_text(markdown_table(table, digits=3))
    plot_histograms(results, run.path("histograms.png"))
    stages = table[table["layer"] != HEADS]
    plot_layer_curves(
        stages,
        [("ratio", "")],
        "own / other mean distance (lower: invariant)",
        "Invariance to the jigsaw transform per layer",
        run.path("invariance_by_layer.png"),
    )
    if labelled:
        plot_layer_curves(
            stages,
            [(f"knn_k{k}", f"k={k}") for k in KS],
            "weighted kNN top-1 (%)",
            "kNN accuracy per layer",
            run.path("knn_by_layer.png"),
        )
    run.write_results(
        {
            "models": table.to_dict(orient="records"),
            "data": str(root),
            "image_size": size,
            "images": len(images),
            "knn": "train/val" if test is not None else "leave-one-out",
            "ks": list(KS),
            "temperature": 0.07,
        }
    )
    return table
