"""End to end from JPEG files on disk: a real `pirl-tools pretrain` run, loader included.

The figure a user sees: the images/s that pretraining logs for its last epoch (DataLoader
start, decoding, crops, batched augmentation, trunk, heads, loss, bank update, SGD), from a
folder of 500x375 JPEGs (scikit-image photos, quality 90, one file per image; at 20,480
images an epoch the loader's start is a few percent of it). On a GPU: ResNet-50 at 224 px,
batch 256, 32,000 negatives, `--compile`, at most 6 loader workers, nvJPEG (`--decode gpu`)
first, then the workers decoding (`--decode cpu`); the target is 2,500 images/s or
more on one GPU. On the CPU the same harness with a tiny trunk (resnet18 x0.25, 224 px views
from the same JPEGs) so that it ends in a minute: two cores shared by the workers and the
step, so it says the harness works, not how a GPU is fed.

InfoNCE rather than the recipe's NCE: the same scores against the same negatives, and a short
run from a random net cannot stop on a non-finite NCE normaliser mid-benchmark.
Run: python -m bench.run --only end_to_end (or python -m bench.end_to_end).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.pretrain_step import photos
from pirl.pretrain import PretrainConfig, pretrain

log = logging.getLogger("bench.end_to_end")


@dataclass(frozen=True)
class Scale:
    """One machine's run: how much data and what trunk."""

    images: int
    batch: int
    arch: str
    width: float
    negatives: int
    workers: int
    compile: bool
    decodes: tuple[str, ...]


GPU = Scale(20_480, 256, "resnet50", 1.0, 32_000, 6, True, ("gpu", "cpu"))
CPU = Scale(1_024, 32, "resnet18", 0.25, 4_096, 2, False, ("cpu",))


def write_jpegs(root: Path, n: int) -> None:
    """n JPEG files: the encoded bytes of bench's 64 photos (six scenes, flipped or not: 12
    distinct images), repeated under new names."""
    encoded = []
    for img in photos(64):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:06d}.jpg").write_bytes(encoded[i % len(encoded)])


def last_epoch(out: Path) -> dict[str, str]:
    """The last row of the run's metrics.csv."""
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))[-1]


def images_per_s(data: Path, out: Path, scale: Scale, decode: str) -> float:
    """Images/s of the last of two epochs, as the run logs it."""
    cfg = PretrainConfig(
        data=str(data),
        out=str(out),
        arch=scale.arch,
        width=scale.width,
        image_size=224,
        epochs=2,
        batch_size=scale.batch,
        num_negatives=scale.negatives,
        loss="infonce",
        eval_every=0,
        num_workers=scale.workers,
        compile=scale.compile,
        decode=decode,
        overwrite=True,
    )
    pretrain(cfg)
    return float(last_epoch(out)["images_per_s"])


def run(scale: Scale | None = None) -> str:
    """Both decode paths on this machine's scale; the Markdown section for BENCHMARKS.md."""
    cuda = torch.cuda.is_available()
    scale = scale or (GPU if cuda else CPU)
    scale = replace(scale, workers=min(scale.workers, os.cpu_count() or 1))
    where = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    rows = []
    t0 = time.perf_counter()
    quiet = logging.getLogger("pirl")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "jpegs"
            write_jpegs(data, scale.images)
            for decode in scale.decodes:
                try:
                    rate = images_per_s(data, Path(tmp) / f"run-{decode}", scale, decode)
                except Exception as exc:  # the other path's figure is still worth having
                    log.exception("--decode %s failed", decode)
                    rows.append(f"| `--decode {decode}` | failed: {type(exc).__name__} |")
                    continue
                rows.append(f"| `--decode {decode}` | {rate:,.0f} |")
    finally:
        quiet.setLevel(level)
    trunk = f"{scale.arch}" + ("" if scale.width == 1 else f" x{scale.width:g}")
    speed = (", --compile" if scale.compile else "") + (", bf16 autocast" if cuda else "")
    return "\n".join(
        [
            f"## End to end from JPEG files (bench/end_to_end.py) on {where}",
            "",
            f"One run on {time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s in all: "
            f"`pirl-tools pretrain` on {scale.images:,} JPEGs 500x375, {trunk}, 224-px views, "
            f"batch {scale.batch}, {scale.negatives:,} negatives (InfoNCE), {scale.workers} "
            f"loader workers{speed}, 2 epochs; "
            "images/s of the second epoch as the run logs it (loader start included). "
            "Target on one GPU: >= 2,500 images/s with <= 6 workers. "
            "Reproduce: `python -m bench.run --only end_to_end`.",
            "",
            "| decoding | images/s |",
            "|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    print(run())
