"""`pirl-tools weights`: look inside any encoder checkpoint, and convert it for other tools."""

from __future__ import annotations

import click

from pirl_tools.options import LazyChoice


def _source_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option(
        "--arch",
        type=LazyChoice("pirl.trunk:ARCHS"),
        default=None,
        help="Architecture; omitted: inferred from the weights.",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=LazyChoice("pirl.weights:FORMATS"),
        default=None,
        help="Checkpoint layout; omitted: detected from the keys.",
    )(f)
    return click.argument("file")(f)


@click.group()
def weights() -> None:
    """Inspect and convert encoder checkpoints (native, torchvision, VISSL, MoCo, PyContrast,
    plain state dicts, detectron2)."""


@weights.command()
@_source_options
def inspect(file: str, fmt: str | None, arch: str | None) -> None:
    """Show a checkpoint's format, architecture, parameter count, heads and memory bank."""
    from pirl.weights import describe, load_encoder

    for line in describe(load_encoder(file, arch=arch, fmt=fmt)):
        click.echo(line)


@weights.command()
@_source_options
@click.option(
    "--to",
    "target",
    type=click.Choice(["torchvision", "safetensors", "detectron2"]),
    required=True,
    help="Layout to write.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write (.pth for torchvision, .safetensors, .pkl for detectron2).",
)
def convert(file: str, fmt: str | None, arch: str | None, target: str, output: str) -> None:
    """Write the trunk as a torchvision state dict (torch or safetensors file) or a detectron2
    MODEL.WEIGHTS pickle."""
    from pirl import weights as w

    enc = w.load_encoder(file, arch=arch, fmt=fmt)
    state = enc.trunk.state_dict()
    save = {
        "torchvision": w.save_torchvision,
        "safetensors": w.save_safetensors,
        "detectron2": w.save_detectron2,
    }[target]
    save(state, output)
    click.echo(f"wrote {output} ({target}, {enc.arch} width {enc.width:g}, {len(state)} tensors)")
    if target == "detectron2":
        click.echo(f"detectron2 config: {w.detectron2_config(enc)}")
