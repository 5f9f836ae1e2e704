"""`pirl-tools weights`: look inside any encoder checkpoint, and convert it for other tools."""

from __future__ import annotations

import click

from pirl.trunk import ARCHS
from pirl.weights import FORMATS, Encoder, load_encoder, save_detectron2, save_torchvision

_D2_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def _source_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option(
        "--arch",
        type=click.Choice(sorted(ARCHS)),
        default=None,
        help="Architecture; omitted: inferred from the weights.",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default=None,
        help="Checkpoint layout; omitted: detected from the keys.",
    )(f)
    return click.argument("file")(f)


def _heads_line(enc: Encoder) -> str:
    if enc.heads is not None:
        return "f, g (PIRL projection heads)"
    if enc.unmapped_heads:
        shown = ", ".join(enc.unmapped_heads[:3])
        return f"present but not PIRL's f and g ({len(enc.unmapped_heads)} tensors: {shown}, ...)"
    return "none"


def describe(enc: Encoder) -> list[str]:
    """The facts a user checks before trusting a checkpoint in an evaluation."""
    memory = f"{enc.memory_size} entries" if enc.memory_size is not None else "none"
    return [
        f"file: {enc.source}",
        f"format: {enc.format}",
        f"architecture: {enc.arch} (width {enc.width:g})",
        f"parameters: {enc.num_params}",
        f"heads: {_heads_line(enc)}",
        f"memory bank: {memory}",
    ]


@click.group()
def weights() -> None:
    """Inspect and convert encoder checkpoints (native, torchvision, VISSL, MoCo, PyContrast,
    plain state dicts, detectron2)."""


@weights.command()
@_source_options
def inspect(file: str, fmt: str | None, arch: str | None) -> None:
    """Show a checkpoint's format, architecture, parameter count, heads and memory bank."""
    for line in describe(load_encoder(file, arch=arch, fmt=fmt)):
        click.echo(line)


@weights.command()
@_source_options
@click.option(
    "--to",
    "target",
    type=click.Choice(["torchvision", "detectron2"]),
    required=True,
    help="Layout to write.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write (.pth for torchvision, .pkl for detectron2).",
)
def convert(file: str, fmt: str | None, arch: str | None, target: str, output: str) -> None:
    """Write the trunk as a torchvision state dict or a detectron2 MODEL.WEIGHTS pickle."""
    enc = load_encoder(file, arch=arch, fmt=fmt)
    state = enc.trunk.state_dict()
    save = save_torchvision if target == "torchvision" else save_detectron2
    save(state, output)
    click.echo(f"wrote {output} ({target}, {enc.arch} width {enc.width:g}, {len(state)} tensors)")
    if target == "detectron2":
        click.echo(f"detectron2 config: {_d2_config(enc)}")


def _d2_config(enc: Encoder) -> str:
    """The detectron2 settings under which torchvision-style weights mean what they meant."""
    ch = enc.trunk.channels
    return (
        f"MODEL.RESNETS.DEPTH {_D2_DEPTH[enc.arch]} MODEL.RESNETS.STEM_OUT_CHANNELS {ch['conv1']} "
        f"MODEL.RESNETS.RES2_OUT_CHANNELS {ch['res2']} MODEL.RESNETS.WIDTH_PER_GROUP {ch['conv1']} "
        "MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
        "MODEL.PIXEL_MEAN [123.675,116.28,103.53] MODEL.PIXEL_STD [58.395,57.12,57.375]"
    )
