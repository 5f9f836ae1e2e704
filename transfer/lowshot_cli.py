"""`pirl-tools transfer lowshot`: Table 3's fine-tuning on 1% / 10% of the labels.

Multi-GPU: `torchrun --nproc_per_node K -m transfer.lowshot_cli --weights ... --data ...`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from pirl.errors import UserError
from pirl.options import data_option, out_option, parse_weights, runtime_options, weights_option
from pirl.tables import markdown_table
from transfer.table3 import table3, write_table3


def _encoders(weights: tuple[str, ...], embedded: bool, seed: int) -> list[tuple[str, str]]:
    """(name, spec) per --weights; on the embedded set a same-shape random trunk is added."""
    from pirl.weights import load_encoder

    pairs = [("random", w) if w.startswith("random") else parse_weights(w) for w in weights]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"--weights: names repeat ({', '.join(names)}); use NAME=PATH")
    if embedded and not any(s.startswith("random") for _, s in pairs):
        enc = load_encoder(pairs[0][1], seed=seed)
        pairs.append(("random", f"random:{enc.arch}@{enc.width:g}"))
    return pairs


@click.command("lowshot")
@weights_option(multiple=True, required=True)
@data_option
@click.option(
    "--percent", type=float, multiple=True, help="Labelled fraction in %, repeatable [1 and 10]."
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
    help="[70; embedded: 30]; the LR step (epoch 30 of 70) scales with it.",
)
@click.option("--lr", type=float, default=0.01, show_default=True, help="Trunk LR.")
@click.option("--head-lr", type=float, default=None, help="Classifier LR [--lr].")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--image-size", type=int, default=None, help="[224; embedded: 64].")
@click.option(
    "--min-crop",
    type=float,
    default=0.08,
    show_default=True,
    help="Smallest RandomResizedCrop area fraction.",
)
@click.option("--resume", is_flag=True, help="Continue the runs in --out from their checkpoints.")
@out_option("runs/lowshot")
@runtime_options(batch_size=None)
def lowshot(
    weights: tuple[str, ...],
    data: str | None,
    percent: tuple[float, ...],
    split_file: str | None,
    out: str,
    seed: int,
    **kwargs: Any,
) -> None:
    """Fine-tune whole encoders on a class-balanced labelled subset; top-1/top-5 on val."""
    import torch.distributed as dist

    from transfer.lowshot import LowshotConfig, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if split_file and len(percent) != 1:
        raise UserError(f"--split-file {split_file}: give one --percent to name its column")
    percents = percent or (1.0, 10.0)
    results = []
    for name, spec in _encoders(weights, data is None, seed):
        for p in percents:
            run_out = Path(out) / name / f"{p:g}pct"
            cfg = LowshotConfig(
                weights=spec,
                name=name,
                data=data,
                percent=p,
                split_file=split_file,
                out=str(run_out),
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


if __name__ == "__main__":
    import torch.distributed as dist

    try:
        lowshot(standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
