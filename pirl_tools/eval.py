"""`pirl-tools eval ...`: score any model's saved outputs against a benchmark's ground truth."""

from __future__ import annotations

import click

from pirl_tools.options import metric_option, out_option, run_folder_options


@click.group("eval")
def eval_group() -> None:
    """Score any model's saved outputs against a benchmark's ground truth."""


@eval_group.command("voc-detections")
@click.option(
    "--data",
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
@metric_option
@out_option(None, help="Also write config.json and results.json into this run folder.")
@run_folder_options(resume=False)
def voc_detections(
    data: str, detections: str, test_set: str, metric: str, out: str | None, overwrite: bool
) -> None:
    """AP, AP50, AP75 of detections in the VOC devkit results format, as detectron2 scores them."""
    import torch

    from pirl.engine import RunDir
    from transfer.detection import uses_07_metric
    from transfer.voc_detection import parse_set_name, score_devkit_detections

    year, split = parse_set_name(test_set)
    run = RunDir(out) if out else None
    if run is not None:
        config = {"data": data, "detections": detections, "test_set": test_set, "metric": metric}
        run.start("eval voc-detections", config, torch.device("cpu"), overwrite=overwrite)
    res = score_devkit_detections(data, detections, year, split, uses_07_metric(metric, test_set))
    if run is not None:
        run.write_results(res)
    click.echo(
        f"AP {res['AP']:.1f}  AP50 {res['AP50']:.1f}  AP75 {res['AP75']:.1f}  ({res['metric']})"
    )
