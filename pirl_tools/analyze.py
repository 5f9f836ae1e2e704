"""`pirl-tools analyze ...`: representation analyses of any encoders (analysis/layers.py)."""

from __future__ import annotations

import click

from pirl.errors import UserError
from pirl_tools.options import (
    data_option,
    embedded_default,
    encoder_specs,
    out_option,
    run_folder_options,
    runtime_options,
    weights_option,
)


@click.group()
def analyze() -> None:
    """Representation analyses: jigsaw invariance and kNN accuracy per layer."""


@analyze.command()
@weights_option(help="Omitted without --data: the embedded PIRL and Jigsaw pretraining.")
@data_option(
    "Image folder (with train/ and val/ for kNN on val; else leave-one-out); omitted: the "
    "embedded set."
)
@out_option("runs/invariance")
@click.option(
    "--image-size", type=int, default=None, help="Input side " + embedded_default(224, 32)
)
@click.option(
    "--max-images",
    type=int,
    default=2000,
    show_default=True,
    help="Seeded subset of images for the distance analysis (all pairs are compared).",
)
@runtime_options(batch_size=64, num_workers=2)
@run_folder_options(resume=False)
def invariance(
    weights: tuple[str, ...],
    data: str | None,
    out: str,
    image_size: int | None,
    max_images: int,
    device: str,
    seed: int,
    batch_size: int,
    num_workers: int,
    overwrite: bool,
) -> None:
    """Distance of each image to its jigsaw transform (f-g heads and every trunk stage) and kNN
    accuracy per layer, for each --weights NAME=PATH; without --data, the embedded set and the
    embedded PIRL and Jigsaw pretraining (run once into the cache)."""
    import logging

    from analysis.layers import layer_study
    from pirl.tables import markdown_table

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if data is not None and not weights:
        raise UserError(f"{data}: pass --weights NAME=PATH for each encoder to analyse")
    table = layer_study(
        encoder_specs(weights),
        data,
        out,
        image_size,
        max_images,
        device,
        seed,
        batch_size,
        num_workers,
        overwrite,
    )
    click.echo(markdown_table(table, digits=3), nl=False)
    click.echo(f"wrote {out}")


@analyze.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
def report(root: str) -> None:
    """report.md from `make paper-small`'s run folders under ROOT: each of the paper's claims
    as holds / does not hold, with the numbers it rests on."""
    from pathlib import Path

    from analysis.report import write_report

    click.echo(f"wrote {write_report(Path(root))}")


@analyze.command(name="lambda")
@click.argument("root", type=click.Path(file_okay=False, exists=True))
def lambda_(root: str) -> None:
    """lambda.md, lambda.csv and lambda.png from `make lambda-sweep`'s run folders ROOT/lam*/:
    what PIRL's patch term adds, as the paper's lambda ablation."""
    from pathlib import Path

    from analysis.lambda_sweep import write_lambda

    path = write_lambda(Path(root))
    click.echo(path.read_text(), nl=False)
    click.echo(f"wrote {path}")
