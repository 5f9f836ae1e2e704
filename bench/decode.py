"""Worker cost of JPEG decoding for pretraining: decode + the two crops per image.

Thread CPU time per image (so the other jobs on a shared machine count far less), 500x375
JPEGs made from scikit-image's sample photos (quality 90), 224-px views: today's path
(load_image, PIL's decode, then CropTransform on the image), the new CPU path (CropTransform
on the file: header, libjpeg-turbo, the same boxes) and the GPU path's worker (EncodedTransform:
bytes and boxes only). The new path's decode and resizes are also timed alone: together they
are the floor of any path that decodes the whole frame. On a GPU also the device side
(DeviceDecode: nvJPEG + crops) per batch.
Run: python -m bench.run --only decode
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.pretrain_step import photos
from pirl.augment import CropTransform, DeviceDecode, EncodedTransform, resize_u8
from pirl.data import load_image
from pirl.decode import decode_full, jpeg_header, read_file
from pirl.jigsaw import JigsawGeometry

N_IMAGES = 48


def per_image_ms(
    fns: dict[str, Callable[[Path], object]], paths: list[Path], reps: int = 9
) -> dict[str, float]:
    """Best of reps, thread CPU milliseconds per image of each fn over the files. The
    functions take turns within every rep, so a shared machine's slow spells hit them alike."""
    for fn in fns.values():
        for p in paths[:4]:
            fn(p)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.thread_time()
            for p in paths:
                fn(p)
            best[name] = min(best[name], time.thread_time() - t)
    return {name: 1000 * b / len(paths) for name, b in best.items()}


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from bench.run import machine

    try:
        rows, where = measure(), machine()
    finally:
        torch.set_num_threads(threads)
    return "\n".join(
        [
            "## JPEG decoding in the workers (bench/decode.py)",
            "",
            f"{N_IMAGES} JPEGs 500x375 (scikit-image photos, quality 90), 224-px view + 255-px "
            f"patch source, one thread, thread CPU time (best of 9, the paths taking turns). "
            f"Machine: {where}. Target: the CPU path at least 2x fewer ms than today. "
            "`python -m bench.run --only decode`",
            "",
            "| worker path | ms per image | vs today |",
            "|---|---|---|",
            *rows,
        ]
    )


def measure() -> list[str]:
    """The table's rows, measured on one thread."""
    geo = JigsawGeometry()
    crop, enc = CropTransform(geo), EncodedTransform(geo)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(photos(N_IMAGES)):
            paths.append(Path(tmp) / f"{i:03d}.jpg")
            img.save(paths[-1], quality=90)
        data = {p: read_file(p) for p in paths}
        full = {p: decode_full(data[p], jpeg_header(data[p])) for p in paths}
        boxes = {p: crop.boxes(500, 375) for p in paths}
        ms = per_image_ms(
            {
                "old": lambda p: crop(load_image(p)),
                "new": crop,
                "decode": lambda p: decode_full(data[p], jpeg_header(data[p])),
                "resize": lambda p: [
                    resize_u8(full[p], b, s) for b, s in zip(boxes[p], crop.sizes, strict=True)
                ],
                "worker": enc,
            },
            paths,
        )
        old, new, floor = ms["old"], ms["new"], ms["decode"] + ms["resize"]
        rows = [
            f"| today: PIL decode + crops | {old:.2f} | 1.0x |",
            f"| CPU: header + libjpeg-turbo + crops | {new:.2f} | {old / new:.2f}x |",
            f"| - of which the libjpeg-turbo decode alone | {ms['decode']:.2f} | |",
            f"| - of which the two antialiased resizes alone | {ms['resize']:.2f} | |",
            f"| floor of this decoder and resize: those two alone, nothing else | {floor:.2f} | "
            f"{old / floor:.2f}x |",
            f"| GPU path, worker side: bytes + boxes | {ms['worker']:.3f} | "
            f"{old / ms['worker']:.0f}x |",
        ]
        if torch.cuda.is_available():
            device = torch.device("cuda")
            items = [enc(p) for p in paths]
            decode = DeviceDecode(crop)
            decode(items, device)
            torch.cuda.synchronize()
            decode.refused = 0  # count the timed calls' refusals only
            t = time.perf_counter()
            for _ in range(5):
                decode(items, device)
            torch.cuda.synchronize()
            wall = 1000 * (time.perf_counter() - t) / 5 / len(items)
            refused = f", {decode.refused // 5} refused: CPU" if decode.refused else ""
            rows.append(f"| GPU path, device side: nvJPEG + crops (wall{refused}) | {wall:.3f} | |")
    return rows
