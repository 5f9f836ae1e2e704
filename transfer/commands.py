"""`pirl-tools transfer ...`: the transfer benchmarks; `linear` runs the Table 2 probes
(transfer/linear_probe.py)."""

from __future__ import annotations

import click

from pirl.errors import UserError
from pirl.options import out_option, runtime_options
from transfer.datasets import (
    BENCHMARKS,
    VOC_LABEL_ENCODINGS,
)
from transfer.detection_cli import detection, table1
from transfer.linear_probe import LAYER_CHOICES, run_linear, run_precomputed
from transfer.lowshot_cli import lowshot


@click.group()
def transfer() -> None:
    """Transfer benchmarks of frozen or fine-tuned encoders (the paper's Tables 1-3)."""


transfer.add_command(lowshot)
transfer.add_command(detection)
transfer.add_command(table1)


@transfer.command("linear")
@click.option(
    "--weights",
    default=None,
    help="Encoder: checkpoint path (any format pirl.weights reads) or random[:ARCH[@W]].",
)
@click.option("--benchmark", type=click.Choice(BENCHMARKS), default="voc07", show_default=True)
@click.option(
    "--data",
    type=click.Path(file_okay=False),
    default=None,
    help="Benchmark folder in its real layout (see transfer/datasets.py).",
)
@click.option("--layer", type=click.Choice(LAYER_CHOICES), default="res5", show_default=True)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Fewer epochs than published; milestones scaled in proportion.",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Input side [224; embedded data: 64]; test Resize is 256/224 of it.",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Train the linear probe on augmented views, or on cached centre crops.",
)
@click.option(
    "--features",
    "features_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="VOC07 on precomputed features: X.npy (n, d) float.",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --features: Y.npy (n, classes) of 1/0/-1 in the --label-encoding.",
)
@click.option(
    "--label-encoding",
    type=click.Choice(list(VOC_LABEL_ENCODINGS)),
    default="devkit",
    show_default=True,
    help="; ".join(f"{k}: {v}" for k, v in VOC_LABEL_ENCODINGS.items())
    + ". Either is converted to devkit on reading.",
)
@click.option(
    "--split",
    "split_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --features: S.npy (n,), 1 = trainval (SVM training), 0 = test.",
)
@out_option("runs/linear")
@runtime_options(batch_size=256)
def linear(
    weights,
    benchmark,
    data,
    layer,
    epochs,
    image_size,
    augment,
    features_path,
    labels_path,
    label_encoding,
    split_path,
    out,
    device,
    seed,
    batch_size,
    num_workers,
) -> None:
    """Linear probes of Table 2: VOC07 SVMs or BN + Linear on ImageNet/Places205/iNat18."""
    if features_path is not None:
        res = run_precomputed(features_path, labels_path, split_path, out, device, label_encoding)
    else:
        if weights is None:
            raise UserError("--weights is required (or --features/--labels/--split)")
        res = run_linear(
            weights,
            benchmark,
            data,
            layer,
            out,
            device,
            seed,
            batch_size,
            num_workers,
            epochs,
            image_size,
            augment,
        )
    click.echo(f"{res['benchmark']} {res['metric']}: {res['value']:.2f}  ({out}/results.json)")
