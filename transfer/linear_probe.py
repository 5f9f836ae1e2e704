"""The linear-probe recipe of Table 2: weights -> frozen trunk -> cached features -> VOC07
SVMs, or BN + Linear for ImageNet / Places205 / iNat18.

Training the BN + Linear probe with augmentation (the published recipe) runs the trunk on
RandomResizedCrop + flip views every epoch; `augment=False` trains on cached centre-crop
features instead, much faster but without augmentation (a documented deviation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from pirl.data import ImageDataset, ImageList
from pirl.engine import (
    RunDir,
    atomic_torch_save,
    require_at_least,
    resolve_device,
    seed_everything,
)
from pirl.errors import UserError
from pirl.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    center_crop_transform,
    feature_channels,
    resize_transform,
)
from pirl.spec import parse_weights
from transfer.classifiers import LinearProbe, scaled_schedule, train_probes, voc07_svm
from transfer.datasets import (
    BENCHMARKS,
    EMBEDDED_SIZE,
    SPLITS,
    Split,
    embedded_benchmarks,
    load_split,
    voc_labels,
)

LAYER_CHOICES = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
FIG5_LAYERS = ("conv1", "res2", "res3", "res4", "res5")  # --layer all: the paper's Fig. 5
METRIC = {"voc07": "mAP", "imagenet": "top1", "places205": "top1", "inat18": "top1"}


def split_images(split: Split) -> ImageList:
    """A benchmark split as the ImageList the extractor reads (multi-label rows: label -1)."""
    labels = split.labels.tolist() if split.labels.ndim == 1 else [-1] * len(split)
    return ImageList(Path("."), split.paths, labels, split.classes)


def _cached(
    ext: FeatureExtractor,
    split: Split,
    transform: Any,
    layers: list[str],
    batch_size: int,
    num_workers: int,
    dtype: str,
) -> dict[str, np.ndarray]:
    """A split's features at every layer from one pass of the extractor, which keys the cache
    every evaluation shares."""
    return ext.extract_layers(
        split_images(split),
        transform,
        layers,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=dtype,
    )


def _batches(
    feats: dict[str, np.ndarray], labels: np.ndarray, batch_size: int, shuffle: bool, seed: int
):
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for i in range(0, n, batch_size):
        idx = np.sort(order[i : i + batch_size])
        x = {k: torch.from_numpy(np.asarray(v[idx], dtype=np.float32)) for k, v in feats.items()}
        yield x, torch.from_numpy(labels[idx])


def parse_layers(spec: str) -> list[str]:
    """`all` (the paper's Fig. 5 stages), one layer or a comma list -> the layers, in order."""
    layers = list(FIG5_LAYERS) if spec == "all" else [x.strip() for x in spec.split(",")]
    unknown = [x for x in layers if x not in LAYER_CHOICES]
    if unknown or not layers:
        raise UserError(
            f"--layer {spec}: {unknown[0] if unknown else 'empty'} is not a layer; choose from "
            f"all, {', '.join(LAYER_CHOICES)} or a comma list"
        )
    return list(dict.fromkeys(layers))


def run_linear(
    weights: str,
    benchmark: str,
    data: str | Path | None = None,
    layer: str = "res5",
    out: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 2,
    epochs: int | None = None,
    image_size: int | None = None,
    augment: bool = True,
    feature_dtype: str = "float16",
    overwrite: bool = False,
    resume: bool = False,
    allow_change: tuple[str, ...] = (),
    logger: str = "none",
) -> dict:
    """Run one Table 2 benchmark for one encoder at one or several layers (`layer`: a layer,
    a comma list or all) from one pass over the data; when `out` is set, claim it as a
    `transfer linear` run folder (an existing run is replaced only with overwrite, continued
    with resume) and write config/metrics/checkpoint/classifier/results there, with the
    per-layer table and plot (layers.csv, layers.md, layers.png) for several layers.

    weights is [NAME=]PATH or a random spec; data None means the embedded set (32-px images,
    image_size 32 unless given); image_size None means 224 on real data. Returns results.json:
    per layer under "layers", and for one layer also its fields at the top level.
    """
    from pirl.weights import load_encoder

    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    layers = parse_layers(layer)
    if resume and benchmark == "voc07":
        raise UserError("--resume: the VOC07 SVMs train in one go; nothing to resume")
    spec = weights
    method, weights = parse_weights(weights)
    if data is None:
        data = embedded_benchmarks()[benchmark]
        image_size = image_size or EMBEDDED_SIZE
    image_size = image_size or 224
    require_at_least(1, batch_size=batch_size, epochs=epochs, image_size=image_size)
    require_at_least(0, num_workers=num_workers)
    config = dict(
        weights=spec,
        benchmark=benchmark,
        data=str(data),
        layer=layer,
        device=device,
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        epochs=epochs,
        image_size=image_size,
        augment=augment,
        feature_dtype=feature_dtype,
        out=None if out is None else str(out),
    )
    seed_everything(seed)
    dev = resolve_device(device)
    train_split, test_split = (load_split(benchmark, data, s) for s in SPLITS[benchmark])
    encoder = load_encoder(weights, seed=seed)
    # float32 storage means the reference's features: float32 compute too (no fp16 autocast)
    ext = FeatureExtractor.for_encoder(encoder, layers[0], dev, amp=feature_dtype == "float16")
    run = RunDir(out) if out is not None else None
    if run is not None:
        run.start(
            "transfer linear",
            config,
            dev,
            overwrite=overwrite,
            resume=resume,
            allow_change=allow_change,
            logger=logger,
            record={
                "method": method,
                "schedule": scaled_schedule(benchmark, epochs) if benchmark != "voc07" else None,
                "arch": encoder.arch,
                "width": encoder.width,
                "format": encoder.format,
            },
        )
    start = time.perf_counter()
    args = (batch_size, num_workers, feature_dtype)
    if benchmark == "voc07":
        tf = resize_transform(image_size)
        xtr, xte = (_cached(ext, s, tf, layers, *args) for s in (train_split, test_split))
        per_layer = {}
        for name in layers:
            res = voc07_svm(xtr[name], train_split.labels, xte[name], test_split.labels, device=dev)
            per_layer[name] = {**res, "classes": train_split.classes}
    else:
        per_layer = _linear_benchmark(
            ext,
            layers,
            benchmark,
            train_split,
            test_split,
            run,
            dev,
            epochs,
            image_size,
            augment,
            seed,
            args,
            resume,
        )
    metric = METRIC[benchmark]
    for name, res in per_layer.items():
        res.update(layer=name, value=res[metric], feature_dim=ext.at(name).dim)
    results = {
        "benchmark": benchmark,
        "method": method,
        "weights": weights,
        "metric": metric,
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in encoder.trunk.parameters()),
        "layers": per_layer,
        **(per_layer[layers[0]] if len(layers) == 1 else {"layer": layer}),
    }
    if run is not None:
        run.write_results(results)
        run.path("row.md").write_text(markdown_row(results) if len(layers) == 1 else "")
        if len(layers) > 1:
            write_layer_table(results, run.root)
    return results


def write_layer_table(results: dict, root: Path) -> tuple[Path, Path, Path]:
    """The per-layer table (layers.csv, layers.md) and the paper's Fig. 5 curve (layers.png:
    the metric per layer) of a run over several layers."""
    import pandas as pd

    from analysis.plots import plot_layer_curves
    from pirl.tables import markdown_table

    metric = results["metric"]
    extra = ["top5"] if metric == "top1" else []
    table = pd.DataFrame(
        [
            {"model": results["method"], "layer": name, "dim": r["feature_dim"], metric: r[metric]}
            | {k: r[k] for k in extra}
            for name, r in results["layers"].items()
        ]
    )
    table.to_csv(root / "layers.csv", index=False)
    (root / "layers.md").write_text(markdown_table(table))
    plot_layer_curves(
        table,
        [(metric, "")],
        f"{results['benchmark']} {metric} (%)",
        f"Linear probe per layer ({results['benchmark']}, paper Fig. 5)",
        root / "layers.png",
    )
    return root / "layers.csv", root / "layers.md", root / "layers.png"


def probe_against_untrained(
    run: str | Path, device: str = "auto", num_workers: int = 2, seed: int = 0
) -> dict:
    """Linear probe at res5 (the ImageNet protocol on cached centre-crop features) of a
    pretraining run's checkpoint and of an untrained trunk of the same architecture, on the
    labelled split the run's kNN monitor used; the two top-1s join the run's results.json."""
    run = RunDir(run)
    config = json.loads(run.path("config.json").read_text())
    common = dict(
        benchmark="imagenet",
        data=config["val_data"],
        layer="res5",
        device=device,
        seed=seed,
        num_workers=num_workers,
        image_size=config["image_size"],
        augment=False,
    )
    ckpt = run.path("checkpoint.pth")
    untrained = f"untrained=random:{config['arch']}@{config['width']:g}"
    results = json.loads(run.path("results.json").read_text())
    results["linear_top1"] = run_linear(f"{config['method']}={ckpt}", **common)["top1"]
    results["random_linear_top1"] = run_linear(untrained, **common)["top1"]
    run.write_results(results)
    return results


def markdown_row(results: dict) -> str:
    """The paper-layout Markdown row (Method, Parameters, benchmark) of one run."""
    method = results["method"]
    head = f"| Method | Parameters | {results['benchmark']} ({results['layer']}) |"
    row = f"| {method} | {results['parameters'] / 1e6:.1f}M | {results['value']:.1f} |"
    return f"{head}\n|---|---|---|\n{row}\n"


def _fitting(ckpt: dict, shapes: dict[str, tuple[int, int]], classes: int) -> dict:
    """The checkpoint, once every layer's saved probe is known to fit this run's probe (so a
    mismatch is RunDir.restore's one line, not a traceback mid-training)."""
    for layer, (dim, channels) in shapes.items():
        LinearProbe(channels, dim, classes).load_state_dict(ckpt["probes"][layer])
    return ckpt


def _linear_benchmark(
    ext, layers, benchmark, train_split, test_split, run, dev, epochs, image_size, augment, seed,
    args, resume,
) -> dict[str, dict]:  # fmt: skip
    batch_size, num_workers, _ = args
    n_epochs, milestones = scaled_schedule(benchmark, epochs)
    test_tf = center_crop_transform(image_size)
    xte = _cached(ext, test_split, test_tf, layers, *args)
    yte = test_split.labels
    if augment:
        train_tf = T.Compose(
            [
                T.RandomResizedCrop(image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = ImageDataset(split_images(train_split), train_tf)

        def train_batches(epoch: int):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=g
            )
            for x, y, _ in loader:
                yield ext.forward_layers(x, layers), y
    else:
        xtr = _cached(ext, train_split, test_tf, layers, *args)

        def train_batches(epoch: int):
            return _batches(xtr, train_split.labels, batch_size, True, seed * 1000 + epoch)

    seed_everything(seed)  # here: extracting features (a cache miss) consumes random numbers
    shapes = {name: (ext.at(name).dim, feature_channels(ext.trunk, name)) for name in layers}
    state = None
    if run is not None and resume:
        state = run.restore(lambda ckpt: _fitting(ckpt, shapes, len(train_split.classes)))
    res = train_probes(
        train_batches,
        lambda: _batches(xte, yte, batch_size, False, 0),
        shapes,
        len(train_split.classes),
        n_epochs,
        milestones,
        batch_size,
        dev,
        log=None if run is None else lambda name, row: run.append_metrics({"layer": name} | row),
        save=None if run is None else run.save_checkpoint,
        state=state,
        seed=seed,
    )
    if run is not None:
        classifier = {name: r["probe"].state_dict() for name, r in res.items()}
        atomic_torch_save(
            {"layers": classifier, "shapes": shapes, "classes": list(train_split.classes)},
            run.path("classifier.pth"),
        )
    recipe = {"epochs": n_epochs, "milestones": list(milestones), "augment": augment}
    return {name: {"top1": r["top1"], "top5": r["top5"], **recipe} for name, r in res.items()}


def _load_npy(path: str | None, flag: str) -> np.ndarray:
    if path is None:
        raise UserError(f"{flag} is required with --features")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a .npy array ({exc})") from None


def run_precomputed(
    features: str,
    labels: str | None,
    split: str | None,
    out: str | Path,
    device: str = "auto",
    label_encoding: str = "devkit",
    overwrite: bool = False,
) -> dict:
    """VOC07 SVM protocol on features someone else extracted (labels in either encoding),
    into `out` claimed as a `transfer linear` run folder (replaced only with overwrite)."""
    x = _load_npy(features, "--features")
    y = _load_npy(labels, "--labels")
    s = _load_npy(split, "--split")
    if x.ndim != 2:
        raise UserError(f"{features}: expected a 2-d (n, d) array, got shape {x.shape}")
    if y.ndim != 2 or len(y) != len(x) or not np.isin(y, (-1, 0, 1)).all():
        raise UserError(f"{labels}: expected an ({len(x)}, classes) array of 1/0/-1")
    if s.shape != (len(x),) or not np.isin(s, (0, 1)).all():
        raise UserError(f"{split}: expected ({len(x)},) of 1 (trainval) / 0 (test)")
    y = voc_labels(y, label_encoding, labels)
    dev = resolve_device(device)
    run = RunDir(out)
    config = {
        "features": features,
        "labels": labels,
        "label_encoding": label_encoding,
        "split": split,
        "device": device,
        "out": str(out),
    }
    run.start("transfer linear", config, dev, overwrite=overwrite)
    tr = np.asarray(s) == 1
    start = time.perf_counter()
    res = voc07_svm(x[tr], y[tr], x[~tr], y[~tr], device=dev)
    results = {
        "benchmark": "voc07",
        "features": str(features),
        "metric": "mAP",
        "value": res["mAP"],
        "seconds": time.perf_counter() - start,
        **res,
    }
    run.write_results(results)
    return results
