"""`pirl-tools transfer ...`: the paper's transfer benchmarks and its Tables 1-3.

linear (Table 2's probes, one benchmark), knn (the weighted kNN classifier), table2 (every
probe, assembled), detection and table1 (Table 1), lowshot and table3 (Table 3); the recipes
live in transfer/ (knn's in analysis/knn.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pirl.errors import UserError
from pirl_tools.options import (
    LazyChoice,
    config_option,
    data_option,
    device_option,
    embedded_default,
    encoder_specs,
    metric_option,
    out_option,
    run_folder_options,
    runtime_options,
    weights_option,
)

BENCHMARKS = LazyChoice("transfer.datasets:BENCHMARKS")


@click.group()
def transfer() -> None:
    """Transfer benchmarks of frozen or fine-tuned encoders (the paper's Tables 1-3)."""


def run_folders(out: str, specs: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(name, spec, run folder) per encoder: OUT itself for one, OUT/NAME for several."""
    if len(specs) == 1:
        return [(specs[0][0], specs[0][1], out)]
    return [(name, spec, str(Path(out) / name)) for name, spec in specs]


def _named_weights(name_key: str) -> Any:
    """config.json records the encoder as weights=PATH plus its name; read back as NAME=PATH."""

    def translate(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        name = data.pop(name_key, None)
        if name and isinstance(data.get("weights"), str):
            data["weights"] = f"{name}={data['weights']}"
        return data

    return translate


# ----------------------------------------------------------------------------- Table 2


@transfer.command("linear")
@config_option()
@weights_option(help="Several: one run folder OUT/NAME each.")
@click.option("--benchmark", type=BENCHMARKS, default="voc07", show_default=True)
@data_option("Benchmark folder in its real layout (see transfer/datasets.py); omitted: embedded.")
@click.option(
    "--layer",
    default="res5",
    show_default=True,
    help="conv1, res2, res3, res4, res5, res5avg, a comma list, or all (conv1..res5, the "
    "paper's Fig. 5): every layer from one pass over the data, each with its probe, in one run "
    "folder with layers.csv/.md and the per-layer plot layers.png.",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Fewer epochs than published; milestones scaled in proportion [paper's].",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="Input side " + embedded_default(224, 32) + "; test Resize is 256/224 of it.",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Train the linear probe on augmented views, or on cached centre crops.",
)
@click.option(
    "--feature-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="float16: features computed under float16 autocast on a GPU and cached in float16 "
    "(relative error about 5e-4); float32: computed and cached in float32, the reference's.",
)
@click.option(
    "--features",
    type=click.Path(dir_okay=False),
    default=None,
    help="VOC07 on precomputed features: X.npy (n, d) float.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --features: Y.npy (n, classes) of 1/0/-1 in the --label-encoding.",
)
@click.option(
    "--label-encoding",
    type=LazyChoice("transfer.datasets:VOC_LABEL_ENCODINGS"),
    default="devkit",
    show_default=True,
    help="How --labels marks difficult and absent (the devkit's <class>_<split>.txt, or "
    "VISSL's <split>_labels.npy); either is converted to devkit on reading.",
)
@click.option(
    "--split",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --features: S.npy (n,), 1 = trainval (SVM training), 0 = test.",
)
@out_option("runs/linear")
@runtime_options(batch_size=256)
@run_folder_options()
def linear(
    weights: tuple[str, ...],
    features: str | None,
    labels: str | None,
    split: str | None,
    label_encoding: str,
    out: str,
    **kwargs: Any,
) -> None:
    """Linear probes of Table 2: VOC07 SVMs or BN + Linear on ImageNet/Places205/iNat18."""
    from transfer.linear_probe import run_linear, run_precomputed

    if features is not None:
        res = run_precomputed(
            features, labels, split, out, kwargs["device"], label_encoding, kwargs["overwrite"]
        )
        click.echo(f"{res['benchmark']} {res['metric']}: {res['value']:.2f}  ({out}/results.json)")
        return
    if not weights:
        raise UserError("--weights is required (or --features/--labels/--split)")
    kwargs["allow_change"] = tuple(kwargs["allow_change"])
    for name, spec, run_out in run_folders(out, encoder_specs(weights)):
        res = run_linear(f"{name}={spec}", out=run_out, **kwargs)
        for layer, r in res["layers"].items():
            click.echo(
                f"{name}: {res['benchmark']} {layer} {res['metric']}: {r['value']:.2f}  "
                f"({run_out}/results.json)"
            )
        if len(res["layers"]) > 1:
            click.echo(f"per-layer table and plot: {run_out}/layers.md, {run_out}/layers.png")


@transfer.command("knn")
@config_option()
@weights_option(required=True, help="Several: one run folder OUT/NAME each.")
@click.option(
    "--benchmark",
    type=LazyChoice("analysis.knn:KNN_BENCHMARKS"),
    default=None,
    help="Read --data in this Table 2 layout; omitted: an ImageFolder with train/ and val/.",
)
@data_option(
    "Labelled data: DIR/train (neighbours) and DIR/val (queries), one sub-folder per class, or "
    "the --benchmark layout; omitted: the embedded set."
)
@click.option(
    "--layer",
    default="res5avg",
    show_default=True,
    help="A layer, a comma list or all (conv1..res5), every one from one pass over the data.",
)
@click.option("--k", "ks", type=int, multiple=True, help="Neighbours, repeatable [20 and 200].")
@click.option(
    "--image-size", type=int, default=None, help="Input side " + embedded_default(224, 32)
)
@out_option("runs/knn")
@runtime_options(batch_size=256)
@run_folder_options(resume=False)
def knn(weights: tuple[str, ...], out: str, **kwargs: Any) -> None:
    """Weighted kNN top-1 (%) on frozen features (NPID votes exp(s/0.07), val against train)."""
    from analysis.knn import run_knn

    for name, spec, run_out in run_folders(out, encoder_specs(weights)):
        res = run_knn(f"{name}={spec}", run_out, **kwargs)
        for layer, accs in res["layers"].items():
            top1 = "  ".join(f"k={k}: {accs[f'top1_k{k}']:.2f}" for k in res["ks"])
            click.echo(f"{name}: kNN top-1 % at {layer}  {top1}")
        click.echo(f"run folder: {run_out} (results.json, knn.md)")


@transfer.command("table2")
@weights_option(help="Omitted: a random trunk and, unless --no-pretrain, embedded PIRL.")
@data_option(
    "Folder with voc07/ imagenet/ places205/ inat18/ (each optional); omitted: embedded set."
)
@out_option("runs/table2", help="Folder for table2.md/.csv and the probes' run folders.")
@click.option(
    "--layer",
    type=LazyChoice("transfer.linear_probe:LAYER_CHOICES"),
    default="res5",
    show_default=True,
)
@click.option("--epochs", type=int, default=None, help="Fewer epochs than published (scaled).")
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Augmented training views [real data: on; embedded: off].",
)
@device_option
@click.option(
    "--pretrain/--no-pretrain",
    default=True,
    show_default=True,
    help="Without --weights: also pretrain PIRL on the embedded set for a row.",
)
@run_folder_options(resume=False)
def table2(
    weights: tuple[str, ...],
    data: str | None,
    out: str,
    layer: str,
    epochs: int | None,
    augment: bool | None,
    device: str,
    pretrain: bool,
    overwrite: bool,
) -> None:
    """Table 2: linear probes of every encoder on every benchmark whose data is present."""
    from pirl.tables import markdown_table
    from transfer.table2 import build_table2

    specs = [f"{name}={spec}" for name, spec in encoder_specs(weights)]
    root = Path(data) if data is not None else None
    table, notes = build_table2(
        specs, root, Path(out), layer, epochs, augment, device, pretrain, overwrite
    )
    click.echo(markdown_table(table))
    for n in notes:
        click.echo(n)
    click.echo(f"wrote {Path(out) / 'table2.md'} and {Path(out) / 'table2.csv'}")


# ----------------------------------------------------------------------------- Table 3


@transfer.command("lowshot")
@config_option(translate=_named_weights("name"))
@weights_option(required=True, help="One run folder OUT/NAME/<percent>pct each.")
@data_option(
    "ImageFolder root with train/ and val/; omitted: the embedded set, with a random-init row."
)
@click.option(
    "--percent",
    type=float,
    multiple=True,
    help="Labelled fraction in %, repeatable [1 and 10].",
)
@click.option(
    "--split-file",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Use the training images listed here (e.g. ImageNet's 1% list) instead.",
)
@click.option(
    "--per-class",
    type=int,
    default=None,
    help="Take this many images of every class instead of a percentage.",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Epochs " + embedded_default(70, 30) + "; the LR step (epoch 30 of 70) scales with it.",
)
@click.option(
    "--milestones",
    type=int,
    multiple=True,
    help="Epochs at which the LR drops 10x, repeatable [30/70 of --epochs].",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Trunk LR " + embedded_default("0.01 x batch / 256", 0.01) + ".",
)
@click.option("--head-lr", type=float, default=None, help="Classifier LR [--lr].")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=True, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--image-size", type=int, default=None, help="Input side " + embedded_default(224, 64)
)
@click.option(
    "--min-crop",
    type=float,
    default=0.08,
    show_default=True,
    help="Smallest RandomResizedCrop area fraction.",
)
@out_option("runs/lowshot", help="Folder for table3.md/.csv and one run folder per fine-tuning.")
@runtime_options(batch_size=None, batch_help="Batch size " + embedded_default(256, 64))
@run_folder_options()
def lowshot(
    weights: tuple[str, ...],
    data: str | None,
    percent: tuple[float, ...],
    split_file: str | None,
    milestones: tuple[int, ...],
    allow_change: tuple[str, ...],
    out: str,
    seed: int,
    **kwargs: Any,
) -> None:
    """Fine-tune whole encoders on a class-balanced labelled subset; top-1/top-5 on val, and
    Table 3 in OUT."""
    import logging

    import torch.distributed as dist

    from pirl.tables import markdown_table
    from transfer.lowshot import LowshotConfig, finetune
    from transfer.table3 import lowshot_encoders, table3, write_table3

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if split_file and len(percent) != 1:
        raise UserError(f"--split-file {split_file}: give one --percent to name its column")
    results = []
    for name, spec in lowshot_encoders(encoder_specs(weights), data is None, seed):
        for p in percent or (1.0, 10.0):
            cfg = LowshotConfig(
                weights=spec,
                name=name,
                data=data,
                percent=p,
                split_file=split_file,
                milestones=list(milestones) or None,
                allow_change=tuple(allow_change),
                out=str(Path(out) / name / f"{p:g}pct"),
                seed=seed,
                **kwargs,
            )
            results.append(finetune(cfg))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    df = table3(results)
    md, csv = write_table3(df, out)
    click.echo(markdown_table(df), nl=False)
    click.echo(f"tables: {md} {csv}")


@transfer.command("table3")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=str))
@out_option("tables", help="Folder for table3.md/.csv.")
def table3(run_dirs: tuple[str, ...], out: str) -> None:
    """Assemble Table 3 from low-shot run folders (every results.json under them)."""
    from transfer.table3 import read_runs, write_table3
    from transfer.table3 import table3 as build

    md, _ = write_table3(build(read_runs(run_dirs)), out)
    click.echo(md.read_text())


# ----------------------------------------------------------------------------- Table 1

# Flags whose default depends on --data: the paper's schedule on VOC, or on the embedded set a
# few minutes on a laptop CPU instead of 25k iterations.
DETECTION_DEFAULTS = {
    "iters": (25_000, 120),
    "batch_size": (16, 4),
    "train_sets": ("2007/trainval,2012/trainval", "2007/trainval"),
    "train_sizes": ("480-800:32", "96-160:16"),
    "test_size": (800, 128),
    "max_size": (1333, 256),
    "roi_batch_size": (512, 32),
    "proposals": ("2000,1000", "200,100"),
    "num_workers": (4, 0),
    "checkpoint_every": (2500, 60),
}


def _dflt(key: str) -> str:
    return embedded_default(*DETECTION_DEFAULTS[key])


def parse_sizes(text: str) -> tuple[int, ...]:
    """'480-800:32' (a range with its step) or '480,512,800' -> shorter-side sizes."""
    try:
        if "-" in text:
            span, _, step = text.partition(":")
            lo, hi = (int(v) for v in span.split("-"))
            sizes = tuple(range(lo, hi + 1, int(step or 32)))
        else:
            sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(
            f"sizes {text!r}: expected LO-HI:STEP or a comma list of integers"
        ) from None
    if not sizes or min(sizes) <= 0:
        raise UserError(f"sizes {text!r}: expected positive sizes")
    return sizes


def _detection_record(data: dict[str, Any]) -> dict[str, Any]:
    """A detection config.json (DetectionConfig's fields) as the command's option values: the
    name joined back into NAME=PATH, lists as the comma strings the options parse."""
    data = _named_weights("name")(data)
    for key in ("train_sets", "train_sizes", "proposals"):
        if isinstance(data.get(key), list):
            data[key] = ",".join(str(v) for v in data[key])
    return data


@transfer.command("detection")
@config_option(translate=_detection_record)
@data_option(
    "VOCdevkit folder (VOC2007/, VOC2012/); omitted: the small embedded set, short schedule."
)
@weights_option(help="Omitted: a random trunk. Several: one run folder OUT/NAME each.")
@click.option("--arch", default=None, help="Architecture when the checkpoint cannot tell.")
@out_option("runs/detection")
@runtime_options(
    batch_size=None,
    num_workers=None,
    batch_help="Images per iteration, all processes " + _dflt("batch_size"),
)
@click.option("--iters", type=int, default=None, help="Iterations " + _dflt("iters"))
@click.option("--lr", type=float, default=0.002, show_default=True,
              help="Base LR for 16 images (VISSL's PIRL/NPID VOC07+12 value); scaled "
                   "linearly with --batch-size.")  # fmt: skip
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--train-sets", default=None, help="Comma list " + _dflt("train_sets"))
@click.option("--test-set", default="2007/test", show_default=True)
@click.option("--train-sizes", default=None,
              help="Shorter sides drawn per image in training: LO-HI:STEP or a list "
                   + _dflt("train_sizes"))  # fmt: skip
@click.option("--test-size", type=int, default=None, help=_dflt("test_size"))
@click.option("--max-size", type=int, default=None, help=_dflt("max_size"))
@click.option("--roi-batch-size", type=int, default=None,
              help="RoIs sampled per image for the box head "
                   + _dflt("roi_batch_size"))  # fmt: skip
@click.option("--proposals", default=None,
              help="RPN proposals kept after NMS per image: TRAIN,TEST "
                   + _dflt("proposals"))  # fmt: skip
@metric_option
@click.option(
    "--checkpoint-every", type=int, default=None, help="Iterations " + _dflt("checkpoint_every")
)
@run_folder_options()
@click.option("--backend", type=click.Choice(["torchvision", "detectron2"]),
              default="torchvision", show_default=True)  # fmt: skip
def detection(weights: tuple[str, ...], **opts: Any) -> None:
    """Table 1: fine-tune Faster R-CNN R50-C4 from the encoder on VOC07+12, AP on VOC07 test."""
    from transfer.detection import DetectionConfig, markdown_row, run_detection

    which = 0 if opts["data"] is not None else 1
    for key, values in DETECTION_DEFAULTS.items():
        if opts[key] is None:
            opts[key] = values[which]
    proposals = parse_sizes(str(opts["proposals"]))
    if len(proposals) != 2:
        raise UserError(f"--proposals {opts['proposals']!r}: expected TRAIN,TEST")
    specs = encoder_specs(weights) or [("random", "")]
    for name, spec, run_out in run_folders(str(opts["out"]), specs):
        cfg = DetectionConfig(
            out=run_out,
            data=opts["data"],
            weights=spec or None,
            name=name,
            arch=opts["arch"],
            train_sets=tuple(s.strip() for s in str(opts["train_sets"]).split(",") if s.strip()),
            test_set=str(opts["test_set"]),
            iters=int(opts["iters"]),
            batch_size=int(opts["batch_size"]),
            lr=float(opts["lr"]),
            momentum=float(opts["momentum"]),
            weight_decay=float(opts["weight_decay"]),
            train_sizes=parse_sizes(str(opts["train_sizes"])),
            test_size=int(opts["test_size"]),
            max_size=int(opts["max_size"]),
            roi_batch_size=int(opts["roi_batch_size"]),
            proposals=(proposals[0], proposals[1]),
            metric=str(opts["metric"]),
            device=str(opts["device"]),
            seed=int(opts["seed"]),
            num_workers=int(opts["num_workers"]),
            checkpoint_every=int(opts["checkpoint_every"]),
            resume=bool(opts["resume"]),
            overwrite=bool(opts["overwrite"]),
            allow_change=tuple(opts["allow_change"]),
            logger=str(opts["logger"]),
            backend=str(opts["backend"]),
        )
        results = run_detection(cfg)
        if results:
            click.echo(
                f"AP {results['AP']:.1f}  AP50 {results['AP50']:.1f}  AP75 {results['AP75']:.1f}"
                f"  ({results.get('metric', '')}, {cfg.test_set})"
            )
            click.echo("| Method | AP | AP50 | AP75 |\n|---|---|---|---|")
            click.echo(markdown_row(name, results))
            click.echo(f"run folder: {cfg.out}")


@transfer.command("table1")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@out_option("tables", help="Folder for table1.md/.csv.")
def table1(run_dirs: tuple[str, ...], out: str) -> None:
    """Assemble detection run folders into Table 1 (table1.csv and table1.md)."""
    from transfer.detection import assemble_table1, table1_markdown

    df = assemble_table1(run_dirs)
    Path(out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(out) / "table1.csv", index=False)
    md = table1_markdown(df)
    (Path(out) / "table1.md").write_text(md + "\n")
    click.echo(md)
