"""Worker cost of JPEG decoding for pretraining: decode + the two crops per image.

Thread CPU time per image (so the other jobs on a shared machine count far less), 500x375
JPEGs made from scikit-image's sample photos (quality 90), 224-px views: today's path
(load_image, PIL's decode, then CropTransform on the image), the new CPU path (CropTransform
on the file: header, libjpeg-turbo, the same boxes) and the GPU path's worker (EncodedTransform:
bytes and boxes only). On a GPU also the device side (DeviceDecode: nvJPEG + crops) per batch.
Run: python -m bench.run --only decode
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.pretrain_step import photos
from pirl.augment import CropTransform, DeviceDecode, EncodedTransform
from pirl.data import load_image
from pirl.jigsaw import JigsawGeometry

N_IMAGES = 48


def per_image_ms(fn, paths: list[Path], reps: int = 3) -> float:
    """Best of reps, thread CPU milliseconds per image of fn over the files (one warm-up)."""
    for p in paths[:4]:
        fn(p)
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        for p in paths:
            fn(p)
        best = min(best, time.thread_time() - t)
    return 1000 * best / len(paths)


def run() -> str:
    torch.set_num_threads(1)
    geo = JigsawGeometry()
    crop, enc = CropTransform(geo), EncodedTransform(geo)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(photos(N_IMAGES)):
            paths.append(Path(tmp) / f"{i:03d}.jpg")
            img.save(paths[-1], quality=90)
        old = per_image_ms(lambda p: crop(load_image(p)), paths)
        new = per_image_ms(crop, paths)
        worker = per_image_ms(enc, paths)
        rows = [
            f"| today: PIL decode + crops | {old:.2f} | 1.0x |",
            f"| CPU: header + libjpeg-turbo + crops | {new:.2f} | {old / new:.1f}x |",
            f"| GPU path, worker side: bytes + boxes | {worker:.3f} | {old / worker:.0f}x |",
        ]
        if torch.cuda.is_available():
            device = torch.device("cuda")
            items = [enc(p) for p in paths]
            decode = DeviceDecode(crop)
            decode(items, device)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                decode(items, device)
            torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t) / 5 / len(items)
            rows.append(f"| GPU path, device side: nvJPEG + crops (wall) | {ms:.3f} | |")
    from bench.run import machine

    return "\n".join(
        [
            "## JPEG decoding in the workers (bench/decode.py)",
            "",
            f"{N_IMAGES} JPEGs 500x375 (scikit-image photos, quality 90), 224-px view + 255-px "
            f"patch source, one thread, thread CPU time (best of 3). Machine: {machine()} "
            "(shared with other jobs when run on a 2-core CI box: noisy). "
            "`python -m bench.run --only decode`",
            "",
            "| worker path | ms per image | vs today |",
            "|---|---|---|",
            *rows,
        ]
    )
