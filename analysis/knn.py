"""Weighted kNN accuracy (%) per layer of a loaded encoder, on the shared extractor's cached
features: the analysis's per-layer study and `pirl-tools transfer knn`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pirl.data import ImageList, embedded_root, list_images
from pirl.engine import RunDir, require_at_least, resolve_device
from pirl.errors import UserError
from pirl.features import FeatureExtractor, center_crop_transform
from pirl.knn import KS, TEMPERATURE, knn_accuracy
from pirl.tables import markdown_table
from pirl.weights import Encoder

KNN_BENCHMARKS = ("imagenet", "places205", "inat18")  # single-label: one class to vote for


def encoder_knn(
    encoder: Encoder,
    train: ImageList,
    test: ImageList | None,
    layers: Sequence[str],
    image_size: int = 224,
    ks: Sequence[int] = KS,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """kNN top-1 (%) per layer and k on benchmark-pooled, cached features of every layer from
    one pass per split (test input: Resize + CenterCrop); `test=None` is leave-one-out."""
    ext = FeatureExtractor.for_encoder(encoder, layers[0], device=resolve_device(device))
    view = center_crop_transform(image_size)
    tr, te = (
        None
        if split is None
        else ext.extract_layers(split, view, layers, batch_size, num_workers, progress=progress)
        for split in (train, test)
    )
    return {
        layer: knn_accuracy(
            tr[layer],
            train.labels,
            None if te is None else te[layer],
            None if test is None else test.labels,
            ks,
        )
        for layer in layers
    }


def _labelled_splits(
    data: str | None, benchmark: str | None
) -> tuple[ImageList, ImageList, str, int | None]:
    """(train, val, data folder, image size or None) of an ImageFolder train/ val/ or a Table 2
    single-label layout; without data the embedded set in that layout."""
    from transfer.datasets import EMBEDDED_SIZE, SPLITS, embedded_benchmarks, load_split
    from transfer.linear_probe import split_images

    if benchmark is not None and benchmark not in KNN_BENCHMARKS:
        raise UserError(f"--benchmark {benchmark}: kNN needs one label per image; choose from "
                        f"{', '.join(KNN_BENCHMARKS)}")  # fmt: skip
    if benchmark is not None:
        root = data if data is not None else embedded_benchmarks()[benchmark]
        train, val = (split_images(load_split(benchmark, root, s)) for s in SPLITS[benchmark])
        return train, val, str(root), None if data is not None else EMBEDDED_SIZE
    root = Path(data) if data is not None else embedded_root(EMBEDDED_SIZE)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise UserError(f"{root}: expected train/ and val/ image folders (or pass --benchmark)")
    train, val = list_images(root / "train"), list_images(root / "val")
    for split in (train, val):
        if min(split.labels, default=-1) < 0:
            raise UserError(f"{split.root}: kNN needs labelled images (one sub-folder per class)")
    return train, val, str(root), None if data is not None else EMBEDDED_SIZE


def run_knn(
    weights: str,
    out: str | Path,
    data: str | None = None,
    benchmark: str | None = None,
    layer: str = "res5avg",
    ks: Sequence[int] = KS,
    image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 2,
    overwrite: bool = False,
) -> dict:
    """The weighted kNN classifier (NPID votes exp(s / 0.07)) of one encoder on a labelled
    data set, val against train, top-1 (%) per layer and k, as a `transfer knn` run folder
    (results.json, knn.csv, knn.md)."""
    from pirl.spec import parse_weights
    from pirl.weights import load_encoder
    from transfer.linear_probe import parse_layers

    layers = parse_layers(layer)
    ks = tuple(ks) or KS
    require_at_least(1, batch_size=batch_size, image_size=image_size, k=min(ks))
    require_at_least(0, num_workers=num_workers)
    method, path = parse_weights(weights)
    train, val, root, size = _labelled_splits(data, benchmark)
    size = image_size or size or 224
    config = dict(
        weights=weights,
        data=data,
        benchmark=benchmark,
        layer=layer,
        ks=list(ks),
        image_size=size,
        device=device,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        out=str(out),
    )
    dev = resolve_device(device)
    run = RunDir(out)
    run.start("transfer knn", config, dev, overwrite=overwrite)
    encoder = load_encoder(path, seed=seed)
    start = time.perf_counter()
    acc = encoder_knn(encoder, train, val, layers, size, ks, str(dev), batch_size, num_workers)
    table = pd.DataFrame(
        [
            {"model": method, "layer": name, **{f"knn_k{k}": a[k] for k in ks}}
            for name, a in acc.items()
        ]
    )
    table.to_csv(run.path("knn.csv"), index=False)
    run.path("knn.md").write_text(markdown_table(table))
    results = {
        "method": method,
        "weights": path,
        "data": root,
        "benchmark": benchmark,
        "train_images": len(train),
        "val_images": len(val),
        "ks": list(ks),
        "temperature": TEMPERATURE,
        "metric": "top1",
        "layers": {name: {f"top1_k{k}": a[k] for k in ks} for name, a in acc.items()},
        "seconds": time.perf_counter() - start,
    }
    run.write_results(results)
    return results
