"""The `pirl-tools` command line: one group, sub-commands that call into the packages."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import click

from pirl.errors import UserError

# Sub-command groups living in other packages, imported only when invoked so that
# `pirl` itself never imports `transfer` or `analysis` at start-up.
LAZY_COMMANDS = {
    "weights": "pirl.weights_cli:weights",
    "transfer": "transfer.commands:transfer",
    "eval": "transfer.detection_cli:eval_group",
    "analyze": "analysis.commands:analyze",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """PIRL pretraining and the paper's evaluations for any ResNet encoder."""
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its CPU-feature probing is no news
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.option(
    "--data",
    default=None,
    help="ImageFolder tree or flat image folder; "
    "omitted: the embedded set (with a small trunk and 32-px images).",
)
@click.option("--out", default="runs/pretrain", show_default=True, help="Run folder.")
@click.option(
    "--method",
    type=click.Choice(["pirl", "npid", "jigsaw"]),
    default="pirl",
    show_default=True,
    help="pirl (lambda 0.5), npid (NPID++, lambda 0) or jigsaw (the Jigsaw-pretext baseline).",
)
@click.option(
    "--num-permutations",
    type=int,
    default=1000,
    show_default=True,
    help="jigsaw: permutation classes (maximal-Hamming set).",
)
@click.option(
    "--arch",
    type=click.Choice(["resnet18", "resnet34", "resnet50", "resnet101"]),
    default=None,
    help="Trunk [resnet50; embedded: resnet18].",
)
@click.option("--width", type=float, default=None, help="Width multiplier [1; embedded: 0.25].")
@click.option("--image-size", type=int, default=None, help="View size [224; embedded: 32].")
@click.option("--epochs", type=int, default=None, help="[800; embedded: 100].")
@click.option("--batch-size", type=int, default=None, help="Global batch [1024; embedded: 64].")
@click.option(
    "--lr", type=float, default=None, help="Base LR [0.03 * batch / 256; embedded: 0.06]."
)
@click.option(
    "--crop-scale",
    type=float,
    default=None,
    help="Smallest area fraction of the image view's random crop [0.08; embedded: 0.5].",
)
@click.option(
    "--hue", type=float, default=None, help="Colour jitter's hue range [0.2; embedded: 0]."
)
@click.option(
    "--photometric",
    type=float,
    default=None,
    help="Probability of VISSL's random photometric ops [0.66; embedded: 0].",
)
@click.option(
    "--lr-interval",
    type=click.Choice(["epoch", "step"]),
    default="epoch",
    show_default=True,
    help="Cosine LR updated once per epoch (VISSL's PIRL) or at every step.",
)
@click.option("--num-negatives", type=int, default=None, help="[32000; embedded: 1024].")
@click.option("--temperature", type=float, default=0.07, show_default=True)
@click.option("--lam", type=float, default=None, help="Weight of the patch term [method's].")
@click.option(
    "--loss",
    type=click.Choice(["nce", "infonce"]),
    default=None,
    help="[nce, the published form; embedded: infonce].",
)
@click.option(
    "--z-momentum",
    type=float,
    default=0.0,
    show_default=True,
    help="Track NCE's Z by EMA with this momentum (0: fix Z at the first step).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bfloat16 autocast on GPU.")
@click.option(
    "--compile",
    is_flag=True,
    help="torch.compile the model: fused kernels, faster steps on a GPU after a first step "
    "that compiles for a minute or two.",
)
@click.option(
    "--augment",
    type=click.Choice(["batched", "pil"]),
    default="batched",
    show_default=True,
    help="batched: workers only crop; jigsaw cut, colour jitter, VISSL's random photometric "
    "ops, grayscale, flip and normalisation run on whole batches on the device. pil: the "
    "per-image PIL pipeline.",
)
@click.option(
    "--shared-negatives",
    is_flag=True,
    help="Draw one set of negatives per batch (and term) instead of one per sample as VISSL "
    "does: one gather of N bank rows instead of B*N, much cheaper.",
)
@click.option(
    "--bank-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage of the memory bank (16-bit halves it); updates are computed in float32.",
)
@click.option(
    "--eval-every",
    type=int,
    default=None,
    help="kNN monitor: every N epochs (and at the end), kNN top-1 (k=20) of the trunk on "
    "--val-data, in metrics.csv and the log; 0: never [0; embedded: 10].",
)
@click.option(
    "--val-data",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Labelled folder for the kNN monitor: DIR/train (neighbours) and DIR/val (queries), "
    "one sub-folder per class [embedded: the embedded set's split].",
)
@click.option("--skip-bad-images", is_flag=True, help="Skip unreadable images (counted).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Local DDP processes.")
def pretrain(nproc: int, **kwargs: Any) -> None:
    """Pretrain a trunk with PIRL (or NPID++) and write OUT/checkpoint.pth."""
    from pirl.pretrain import PretrainConfig, pretrain_multiprocess
    from pirl.pretrain import pretrain as run_pretrain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PretrainConfig(**kwargs)
    if nproc > 1:
        pretrain_multiprocess(cfg, nproc)
    else:
        run_pretrain(cfg)
    ckpt = Path(cfg.out) / "checkpoint.pth"
    if cfg.data is None:  # the embedded demo: show what was learned
        from transfer.linear_probe import probe_against_untrained

        results = probe_against_untrained(cfg.out, cfg.device, cfg.num_workers, cfg.seed)
        click.echo(comparison(cfg.method, results))
    click.echo(f"checkpoint: {ckpt}")
    click.echo(
        f"evaluate it: pirl-tools transfer linear --weights {cfg.method}={ckpt} --benchmark voc07"
    )


def comparison(method: str, results: dict[str, Any]) -> str:
    """The embedded run against an untrained trunk of its architecture, as a short table."""
    name = {"pirl": "PIRL", "npid": "NPID++", "jigsaw": "Jigsaw"}[method]
    rows = [
        (label, results[key], results[f"random_{key}"])
        for label, key in (
            ("kNN top-1 (k=20), %", "knn_top1"),  # absent with --eval-every 0
            ("linear probe res5 top-1, %", "linear_top1"),
        )
        if key in results
    ]
    return "\n".join(
        [
            "held-out embedded split:",
            f"{'':<28}{name:>8}{'untrained':>11}",
            *(f"{label:<28}{ours:>8.1f}{random:>11.1f}" for label, ours, random in rows),
            f"final training loss {results['final_loss']:.3f} "
            f"(chance level {results['chance_loss']:.3f})",
        ]
    )
