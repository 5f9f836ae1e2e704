"""`pirl-tools pretrain`: PIRL, NPID++ or Jigsaw pretraining of a trunk (pirl/pretrain.py)."""

from __future__ import annotations

from typing import Any

import click

from pirl_tools.options import (
    config_option,
    data_option,
    embedded_default,
    out_option,
    run_folder_options,
    runtime_options,
)


@click.command()
@config_option()
@data_option(
    "ImageFolder tree or flat image folder; omitted: the embedded set (with a small trunk and "
    "32-px images)."
)
@out_option("runs/pretrain")
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
    default=2000,
    show_default=True,
    help="jigsaw: permutation classes (maximal-Hamming set; VISSL's ResNet Jigsaw uses 2,000).",
)
@click.option(
    "--arch",
    type=click.Choice(["resnet18", "resnet34", "resnet50", "resnet101"]),
    default=None,
    help="Trunk " + embedded_default("resnet50", "resnet18") + ".",
)
@click.option(
    "--width", type=float, default=None, help="Width multiplier " + embedded_default(1, 0.25)
)
@click.option("--image-size", type=int, default=None, help="View size " + embedded_default(224, 32))
@click.option(
    "--epochs", type=int, default=None, help="Epochs " + embedded_default(800, 100) + "; jigsaw 105"
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Base LR " + embedded_default("0.03 * batch / 256", 0.06) + "; jigsaw 0.1 * batch / 256",
)
@click.option(
    "--final-lr-ratio",
    type=float,
    default=1e-3,
    show_default=True,
    help="Cosine schedule's last LR as a fraction of --lr.",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "steps"]),
    default=None,
    help="cosine to --final-lr-ratio (PIRL, NPID++), or steps: VISSL's Jigsaw schedule, warm-up "
    "over 5/105 of the run, LR / 10 at 30, 60, 90 and 100 of 105 [method's].",
)
@click.option(
    "--lr-interval",
    type=click.Choice(["epoch", "step"]),
    default="epoch",
    show_default=True,
    help="LR updated once per epoch (VISSL's) or at every step.",
)
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option(
    "--crop-scale",
    type=float,
    default=None,
    help="Smallest area fraction of the image view's random crop " + embedded_default(0.08, 0.5),
)
@click.option(
    "--hue", type=float, default=None, help="Colour jitter's hue range " + embedded_default(0.2, 0)
)
@click.option(
    "--photometric",
    type=float,
    default=None,
    help="Probability of VISSL's random photometric ops " + embedded_default(0.66, 0),
)
@click.option(
    "--patch-augment",
    type=click.Choice(["independent", "shared", "none"]),
    default=None,
    help="The jigsaw patches' colour jitter, grayscale, flip (and photometric ops): each patch "
    "its own draw, one draw for an image's nine, or none "
    + embedded_default("independent", "none"),
)
@click.option(
    "--npid-augment",
    type=click.Choice(["vissl", "pirl"]),
    default=None,
    help="npid: VISSL's NPID++ augmentation (jitter with hue 0.4 before the crop, flip; no "
    "grayscale or photometric ops) or PIRL's image view " + embedded_default("vissl", "pirl"),
)
@click.option(
    "--num-negatives",
    type=int,
    default=None,
    help="Negatives per sample from the memory bank " + embedded_default(32000, 1024),
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Temperature of the contrastive terms " + embedded_default(0.07, 0.2),
)
@click.option("--lam", type=float, default=None, help="Weight of the patch term [method's].")
@click.option(
    "--loss",
    type=click.Choice(["nce", "infonce"]),
    default=None,
    help="Loss form " + embedded_default("nce, the published form", "infonce"),
)
@click.option(
    "--z-momentum",
    type=float,
    default=0.0,
    show_default=True,
    help="Track NCE's Z by EMA with this momentum (0: fix Z at the first step).",
)
@click.option(
    "--bank-momentum",
    type=float,
    default=0.5,
    show_default=True,
    help="Memory bank update: m * old + (1 - m) * new.",
)
@click.option(
    "--embed-dim", type=int, default=128, show_default=True, help="Output size of heads f and g."
)
@runtime_options(
    batch_size=None, batch_help="Global batch " + embedded_default(1024, 64) + "; jigsaw 256"
)
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
    "--decode",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Where the batched path decodes JPEGs: gpu (nvJPEG on the training GPU, workers only "
    "read the files; opt-in until checked on a GPU), cpu (libjpeg-turbo in the workers), "
    "auto: cpu.",
)
@click.option(
    "--patch-bn-stats",
    is_flag=True,
    help="Fold the patch pass into BN's running statistics too, as VISSL does; by default they "
    "are the image pass's alone, the statistics every evaluation of images uses.",
)
@click.option(
    "--shared-negatives",
    is_flag=True,
    help="Draw one set of negatives per batch (and term) instead of one per sample as VISSL "
    "does: one gather of N bank rows instead of B*N, much cheaper.",
)
@click.option(
    "--bank-init-ranks",
    type=int,
    default=None,
    help="The starting memory bank as VISSL's on N GPUs: each row the mean of N random unit "
    "rows (VISSL averages its ranks' random banks), which sets NCE's fixed Z; 1: unit rows "
    + embedded_default(32, 1)
    + ".",
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
    "--val-data, in metrics.csv and the log; 0: never " + embedded_default(0, 10) + ".",
)
@click.option(
    "--val-data",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Labelled folder for the kNN monitor: DIR/train (neighbours) and DIR/val (queries), "
    "one sub-folder per class [embedded: the embedded set's split].",
)
@click.option(
    "--save-every",
    type=int,
    default=0,
    show_default=True,
    help="Also keep OUT/checkpoint_epoch{E}.pth every N epochs (checkpoint.pth, which --resume "
    "continues from, is rewritten every epoch); 0: never.",
)
@click.option("--skip-bad-images", is_flag=True, help="Skip unreadable images (counted).")
@run_folder_options()
@click.option(
    "--nproc",
    type=int,
    default=1,
    show_default=True,
    help="Local DDP processes (or launch with torchrun ... -m pirl_tools pretrain).",
)
def pretrain(nproc: int, **kwargs: Any) -> None:
    """Pretrain a trunk with PIRL (or NPID++, Jigsaw) and write OUT/checkpoint.pth, and at the
    end the trunk alone in torchvision's layout (OUT/trunk.pth, OUT/trunk.safetensors)."""
    import logging
    from pathlib import Path

    from pirl.pretrain import TRUNK_EXPORTS, PretrainConfig, pretrain_multiprocess
    from pirl.pretrain import pretrain as run_pretrain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs["allow_change"] = tuple(kwargs["allow_change"])
    cfg = PretrainConfig(**kwargs)
    if nproc > 1:
        pretrain_multiprocess(cfg, nproc)
    else:
        run_pretrain(cfg)
    from pirl.engine import world

    if world()[0] != 0:  # under torchrun or srun, rank 0 alone reports
        return
    ckpt = Path(cfg.out) / "checkpoint.pth"
    if cfg.data is None:  # the embedded demo: show what was learned
        from pirl.tables import comparison
        from transfer.linear_probe import probe_against_untrained

        results = probe_against_untrained(cfg.out, cfg.device, cfg.num_workers, cfg.seed)
        click.echo(comparison(cfg.method, results))
    click.echo(f"checkpoint: {ckpt}")
    exports = ", ".join(str(Path(cfg.out) / name) for name in TRUNK_EXPORTS)
    click.echo(f"trunk in torchvision's layout (no fc): {exports}")
    click.echo(
        f"evaluate it: pirl-tools transfer linear --weights {cfg.method}={ckpt} --benchmark voc07"
    )
