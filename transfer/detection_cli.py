"""Command line for Table 1: `transfer detection`, `transfer table1`, `eval voc-detections`."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from pirl.engine import RunDir
from pirl.errors import UserError
from pirl.options import out_option, parse_weights, runtime_options, weights_option

# The embedded default: a few minutes on a laptop CPU instead of the paper's 25k iterations.
EMBEDDED = {
    "iters": 120,
    "batch_size": 4,
    "train_sets": "2007/trainval",
    "train_sizes": "96-160:16",
    "test_size": 128,
    "max_size": 256,
    "roi_batch_size": 32,
    "proposals": "200,100",
    "num_workers": 0,
    "checkpoint_every": 60,
}


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


def _metric(metric: str, test_set: str) -> bool:
    """11-point for VOC2007 as detectron2 does, the area metric for later years ('auto')."""
    if metric == "auto":
        return test_set.split("/")[0] == "2007"
    return metric == "11point"


def _method_name(spec: str | None) -> tuple[str | None, str]:
    if spec is None:
        return None, "random"
    if "=" not in spec and spec.startswith("random"):
        return spec, spec
    name, path = parse_weights(spec)
    return path, name


METRIC = click.option(
    "--metric",
    type=click.Choice(["auto", "11point", "area"]),
    default="auto",
    show_default=True,
    help="VOC07 11-point AP (detectron2 for 2007) or the VOC2010+ area; auto picks by year.",
)


@click.command("detection")
@click.option(
    "--voc-root",
    type=click.Path(file_okay=False),
    default=None,
    help="VOCdevkit folder (VOC2007/, VOC2012/); omitted: the small embedded set, short schedule.",
)
@weights_option()
@click.option("--arch", default=None, help="Architecture when the checkpoint cannot tell.")
@out_option("runs/detection")
@runtime_options(batch_size=16, num_workers=4)
@click.option("--iters", type=int, default=25_000, show_default=True)
@click.option("--lr", type=float, default=0.002, show_default=True,
              help="Base LR for 16 images (VISSL's PIRL/NPID VOC07+12 value); scaled "
                   "linearly with --batch-size.")  # fmt: skip
@click.option("--train-sets", default="2007/trainval,2012/trainval", show_default=True)
@click.option("--test-set", default="2007/test", show_default=True)
@click.option("--train-sizes", default="480-800:32", show_default=True,
              help="Shorter sides drawn per image in training: LO-HI:STEP or a list.")  # fmt: skip
@click.option("--test-size", type=int, default=800, show_default=True)
@click.option("--max-size", type=int, default=1333, show_default=True)
@click.option("--roi-batch-size", type=int, default=512, show_default=True,
              help="RoIs sampled per image for the box head.")  # fmt: skip
@click.option("--proposals", default="2000,1000", show_default=True,
              help="RPN proposals kept after NMS per image: TRAIN,TEST.")  # fmt: skip
@METRIC
@click.option("--checkpoint-every", type=int, default=2500, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the run folder's checkpoint.pt.")
@click.option("--backend", type=click.Choice(["torchvision", "detectron2"]),
              default="torchvision", show_default=True)  # fmt: skip
@click.pass_context
def detection(ctx: click.Context, **opts: object) -> None:
    """Table 1: fine-tune Faster R-CNN R50-C4 from the encoder on VOC07+12, AP on VOC07 test."""
    from transfer.detection import DetectionConfig, Schedule, markdown_row, run_detection

    if opts["voc_root"] is None:
        for key, value in EMBEDDED.items():
            if ctx.get_parameter_source(key) == ParameterSource.DEFAULT:
                opts[key] = value
    weights, name = _method_name(opts["weights"])  # type: ignore[arg-type]
    proposals = parse_sizes(str(opts["proposals"]))
    if len(proposals) != 2:
        raise UserError(f"--proposals {opts['proposals']!r}: expected TRAIN,TEST")
    test_set = str(opts["test_set"])
    cfg = DetectionConfig(
        out=str(opts["out"]),
        voc_root=opts["voc_root"],  # type: ignore[arg-type]
        weights=weights,
        name=name,
        arch=opts["arch"],  # type: ignore[arg-type]
        train_sets=tuple(s.strip() for s in str(opts["train_sets"]).split(",") if s.strip()),
        test_set=test_set,
        schedule=Schedule.scaled(int(opts["iters"]), int(opts["batch_size"]), float(opts["lr"])),
        train_sizes=parse_sizes(str(opts["train_sizes"])),
        test_size=int(opts["test_size"]),
        max_size=int(opts["max_size"]),
        roi_batch_size=int(opts["roi_batch_size"]),
        proposals=(proposals[0], proposals[1]),
        use_07_metric=_metric(str(opts["metric"]), test_set),
        device=str(opts["device"]),
        seed=int(opts["seed"]),
        num_workers=int(opts["num_workers"]),
        checkpoint_every=int(opts["checkpoint_every"]),
        resume=bool(opts["resume"]),
        backend=str(opts["backend"]),
    )
    results = run_detection(cfg)
    if results:
        click.echo(
            f"AP {results['AP']:.1f}  AP50 {results['AP50']:.1f}  AP75 {results['AP75']:.1f}  "
            f"({results.get('metric', '')}, {cfg.test_set})"
        )
        click.echo("| Method | AP | AP50 | AP75 |\n|---|---|---|---|")
        click.echo(markdown_row(name, results))
        click.echo(f"run folder: {cfg.out}")


@click.command("table1")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@out_option("tables")
def table1(run_dirs: tuple[str, ...], out: str) -> None:
    """Assemble detection run folders into Table 1 (table1.csv and table1.md)."""
    from transfer.detection import assemble_table1, table1_markdown

    df = assemble_table1(run_dirs)
    Path(out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(out) / "table1.csv", index=False)
    md = table1_markdown(df)
    (Path(out) / "table1.md").write_text(md + "\n")
    click.echo(md)


@click.group("eval")
def eval_group() -> None:
    """Score any model's saved outputs against a benchmark's ground truth."""


@eval_group.command("voc-detections")
@click.option(
    "--voc-root",
    required=True,
    type=click.Path(file_okay=False),
    help="VOCdevkit folder with the test split's Annotations and ImageSets.",
)
@click.option(
    "--detections",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of comp4_det_<split>_<class>.txt: image_id score x1 y1 x2 y2.",
)
@click.option("--test-set", default="2007/test", show_default=True)
@METRIC
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Also write results.json into this run folder.")  # fmt: skip
def voc_detections(
    voc_root: str, detections: str, test_set: str, metric: str, out: str | None
) -> None:
    """AP, AP50, AP75 of detections in the VOC devkit results format, as detectron2 scores them."""
    from transfer.voc_detection import parse_set_name, score_devkit_detections

    year, split = parse_set_name(test_set)
    res = score_devkit_detections(voc_root, detections, year, split, _metric(metric, test_set))
    if out:
        run = RunDir(out)
        run.write_config({"voc_root": voc_root, "detections": detections, "test_set": test_set,
                          "metric": res["metric"]})  # fmt: skip
        run.write_results(res)
    click.echo(
        f"AP {res['AP']:.1f}  AP50 {res['AP50']:.1f}  AP75 {res['AP75']:.1f}  ({res['metric']})"
    )
