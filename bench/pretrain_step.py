"""PIRL pretraining step: batched augmentation, loss + bank, start-up, step overhead, loading.

Everything runs in one process on the same machine, side by side:
- augmentation cost per sample on one core (thread CPU time, so other load on a shared machine
  does not count): the PIL path (pirl.jigsaw.PirlTransform) against the batched path
  (pirl.augment: per-sample crops as a worker does them, then BatchAugment on the batch);
- loss + memory bank per batch of 8 with 32,000 negatives and a 1,281,167-entry bank (the
  ImageNet size): the plain gather-bmm-autograd form public implementations use, against ours
  per sample (as VISSL draws), with one shared draw, and with a 16-bit bank;
- start-up: building the bank (and drawing the first negatives) for 1,281,167 entries;
- the full PIRL step (batched augmentation, trunk on 1 image + 9 patches, heads, NCE, backward,
  bank update, SGD) against a bare trunk forward + backward on the same tensors;
- data loading (JPEG decode + crops in a DataLoader) against the step's throughput.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

import pirl.memory
from pirl.augment import BatchAugment, CropTransform
from pirl.data import ImageDataset, collate_skipping, list_images
from pirl.jigsaw import JigsawGeometry, PirlTransform
from pirl.memory import MemoryBank
from pirl.nce import PirlLoss
from pirl.pretrain import PretrainConfig, device_views, make_trainer

IMAGENET = 1_281_167
NEGATIVES = 32_000
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def photos(n: int) -> list[Image.Image]:
    """n decoded RGB photos at ImageNet's typical 500x375, from scikit-image's packaged set."""
    out = []
    for i in range(n):
        img = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        pil = Image.fromarray(img[..., :3]).resize((500, 375), Image.BILINEAR)
        out.append(pil.transpose(Image.FLIP_LEFT_RIGHT) if i // len(PHOTOS) % 2 else pil)
    return out


def cpu_seconds(fn: Callable[[], object], reps: int = 2) -> float:
    """Best thread CPU time of fn over reps (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def timed(
    fn: Callable[[], object], reps: int = 3, sync: bool = False, warm: bool = True
) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of fn over reps after one warm-up call. CPU time
    counts only this process's work, so other jobs on a shared machine inflate it far less."""
    if warm:
        fn()
    walls, cpus = [], []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if sync:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def augmentation_rows(batch: int = 64) -> tuple[list[str], float]:
    """Per-sample CPU cost of both paths on one thread; returns table rows and the speed-up."""
    geo = JigsawGeometry()
    imgs = photos(batch)
    pil = PirlTransform(geo)
    crop = CropTransform(geo)
    aug = BatchAugment(geo)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_pil = cpu_seconds(lambda: [pil(im) for im in imgs[: batch // 2]]) / (batch // 2)
        crops = [crop(im) for im in imgs]
        u8 = torch.stack([a for a, _ in crops]), torch.stack([b for _, b in crops])
        t_crop = cpu_seconds(lambda: [crop(im) for im in imgs]) / batch
        t_ops = cpu_seconds(lambda: aug(*u8, gen)) / batch
        t_pil_crop = cpu_seconds(
            lambda: [(pil.image_crop(im), pil.source_crop(im)) for im in imgs[: batch // 2]]
        ) / (batch // 2)
    finally:
        torch.set_num_threads(threads)
    t_batched = t_crop + t_ops
    rows = [
        "| path | CPU ms per sample (1 core) | samples/s/core |",
        "|---|---|---|",
        f"| PIL (crops + jigsaw + photometric per image) | {1e3 * t_pil:.2f} | {1 / t_pil:.0f} |",
        f"| batched (crops in the worker + batch ops, batch {batch}) | {1e3 * t_batched:.2f} "
        f"| {1 / t_batched:.0f} |",
        f"| - of which the worker's two crops (the only part on a GPU node's CPU) | "
        f"{1e3 * t_crop:.2f} | {1 / t_crop:.0f} |",
        "| - of which the batch ops (jigsaw cut, jitter, photometric ops, gray, flip, norm) | "
        f"{1e3 * t_ops:.2f} | {1 / t_ops:.0f} |",
        f"| PIL path without its crops (the part moved to the batch) | "
        f"{1e3 * (t_pil - t_pil_crop):.2f} | {1 / (t_pil - t_pil_crop):.0f} |",
    ]
    notes = [
        "",
        f"Whole path: batched is {t_pil / t_batched:.1f}x the PIL path in samples/s/core; the "
        f"part that moved to the batch is {(t_pil - t_pil_crop) / t_ops:.1f}x faster. The "
        f"worker's two crops ({1e3 * t_crop:.2f} ms: torch's 8-bit antialiased resize, PIL's "
        f"filter within one grey level, where PIL's own crops take {1e3 * t_pil_crop:.2f} ms) "
        "are all a core does on a GPU node, where the batch ops run on the GPU: "
        f"{1 / t_crop:.0f} samples/s per core, {t_pil / t_crop:.1f}x the PIL path.",
    ]
    return rows + notes, t_pil / t_batched


def plain_step(
    crit: PirlLoss, f0: torch.Tensor, g0: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
) -> None:
    """Public implementations' form: B*N rows gathered, bmm, autograd keeps the rows."""
    memory = crit.memory
    f, g = f0.clone().requires_grad_(), g0.clone().requires_grad_()
    loss = torch.zeros(())
    for z in (g, f):  # the patch term first: it fixes the shared Z
        neg = torch.randint(0, memory.size, (len(z), crit.num_negatives), generator=gen)
        pos = (memory.bank[idx] * z).sum(1)
        loss = loss + 0.5 * crit.criterion(
            pos, torch.bmm(memory.bank[neg], z.unsqueeze(2)).squeeze(2)
        )
    loss.backward()
    memory.update(idx, f.detach())


def our_step(
    crit: PirlLoss, f0: torch.Tensor, g0: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
) -> None:
    """PirlLoss as training runs it: both terms, backward, bank update."""
    f, g = f0.clone().requires_grad_(), g0.clone().requires_grad_()
    crit(f, g, idx, gen).backward()
    crit.memory.update(idx, f.detach())


def loss_memory_rows(batch: int = 8) -> list[str]:
    """Loss forward + backward + bank update per batch of 8 at 32,000 negatives, on one thread
    (CPU time) and on all of torch's threads (wall time: the whole CPU, as training runs)."""
    threads = torch.get_num_threads()
    rows = [
        f"| loss + memory variant | bank | 1 thread: CPU s per batch of 8 "
        f"| {threads} threads: wall s per batch of 8 |",
        "|---|---|---|---|",
    ]
    f0 = F.normalize(torch.randn(batch, 128, generator=torch.Generator().manual_seed(1)), dim=1)
    g0 = F.normalize(torch.randn(batch, 128, generator=torch.Generator().manual_seed(2)), dim=1)
    idx = torch.randint(0, IMAGENET, (batch,), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        rows += _loss_memory_rows(dtype, f0, g0, idx, gen, threads)
    return rows


def _loss_memory_rows(
    dtype: torch.dtype,
    f0: torch.Tensor,
    g0: torch.Tensor,
    idx: torch.Tensor,
    gen: torch.Generator,
    threads: int,
) -> list[str]:
    """The rows for one bank dtype (one bank alive at a time: 656 MB in float32)."""
    memory = MemoryBank(IMAGENET, 128, seed=0, dtype=dtype)
    per_sample = PirlLoss(memory, NEGATIVES, 0.07, 0.5, "nce")
    shared = PirlLoss(memory, NEGATIVES, 0.07, 0.5, "nce", shared_negatives=True)
    variants = [
        ("ours, per sample (as VISSL)", our_step, per_sample),
        ("ours, --shared-negatives", our_step, shared),
    ]
    if dtype == torch.float32:
        variants.insert(
            0, ("plain gather + bmm (public implementations' form)", plain_step, per_sample)
        )
    name = str(dtype).removeprefix("torch.")
    rows = []
    for label, step, crit in variants:
        fn = partial(step, crit, f0, g0, idx, gen)
        torch.set_num_threads(1)
        try:
            _, cpu = timed(fn)
        finally:
            torch.set_num_threads(threads)
        wall, _ = timed(fn)
        rows.append(f"| {label} | {name} | {cpu:.3f} | {wall:.3f} |")
    return rows


def startup_seconds() -> tuple[float, float]:
    """Bank for 1,281,167 entries plus the first draw of 8 x 32,000 negatives: (wall, CPU)."""
    t, c = time.perf_counter(), time.process_time()
    memory = MemoryBank(IMAGENET, 128, seed=0)
    memory.sample((8, NEGATIVES), torch.Generator().manual_seed(0))
    return time.perf_counter() - t, time.process_time() - c


def step_rows(
    device: torch.device, batch: int, reps: int, compiled: bool = False
) -> tuple[list[str], float]:
    """The training loop's own step (PirlTrainer.loss and .update: batched augmentation on the
    device, trunk on 1 image + 9 patches, heads, NCE, backward, SGD, bank update; bf16 autocast and
    channels_last on a GPU) against a bare trunk forward + backward on the same views."""
    geo = JigsawGeometry()
    crop = CropTransform(geo)
    samples = [(crop(im), 0, i) for i, im in enumerate(photos(batch))]
    views = collate_skipping(samples)[0][0]
    cuda = device.type == "cuda"
    copy_rows = []
    if cuda:  # training copies pinned batches on a side stream during the step (prefetched)
        pinned = tuple(v.pin_memory() for v in views)
        wall, _ = timed(lambda: [v.to(device, non_blocking=True) for v in pinned], 10, True)
        copy_rows = [
            f"| host-to-device copy of the uint8 crops (pinned; overlapped with the step in "
            f"training, so not in the step) | {wall:.4f} | {batch / wall:.0f} | - |"
        ]
        views = tuple(v.to(device) for v in views)
    cfg = PretrainConfig(
        data="photos",  # never read: with a data set named, resolved() fills the paper's recipe
        arch="resnet50",
        width=1.0,
        batch_size=batch,
        num_negatives=NEGATIVES,
        loss="nce",
        lam=0.5,
        lr=0.01,
        amp=cuda,
    ).resolved()
    trainer = make_trainer(cfg, IMAGENET, device)
    model = trainer.model
    run_model = torch.compile(model) if compiled else model
    aug = trainer.augment  # the paper's augmentation, as the training loop builds it
    gen = torch.Generator().manual_seed(0)
    neg_gen = torch.Generator(device).manual_seed(1)
    idx = torch.arange(batch, device=device)
    images, patches = device_views(views, aug, device, gen, True)

    def trunk_sum(images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        flat = patches.flatten(0, 1)
        if cuda:
            flat = flat.contiguous(memory_format=torch.channels_last)
        return model.trunk.pooled(images).float().sum() + model.trunk.pooled(flat).float().sum()

    run_trunk = torch.compile(trunk_sum) if compiled else trunk_sum

    def bare() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = run_trunk(images, patches)
        out.backward()
        model.zero_grad(set_to_none=True)

    def full() -> None:
        loss, f, _ = trainer.loss(run_model, views, idx, neg_gen, gen, cuda)
        loss.item()  # the training loop's one host sync (its finite check)
        trainer.update(loss, 0.01, idx, f)

    dim = model.trunk.out_dim
    pooled_i = torch.randn(batch, dim, device=device, requires_grad=True)
    pooled_p = torch.randn(batch * 9, dim, device=device, requires_grad=True)

    def extras() -> None:  # everything of the step but the trunk, on pooled stand-ins
        device_views(views, aug, device, gen, True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            f, g = model.heads.f(pooled_i), model.heads.g(pooled_p)
        trainer.criterion(f.float(), g.float(), idx, neg_gen).backward()
        trainer.memory.update(idx, f.detach().float())
        trainer.optimizer.step()

    model.train()
    pick = 0 if cuda else 1  # GPU: wall time; CPU: process CPU time (robust to other jobs)
    variants = {"bare": bare, "full": full, "extras": extras}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up (cuDNN autotuning, SGD momentum buffers, allocator, caches)
        fn()
    for _ in range(reps):  # interleaved, so drift on a shared machine hits both alike
        for k, fn in variants.items():
            times[k].append(timed(fn, 1, cuda, warm=False)[pick])
    t_bare, t_full, t_extra = (float(np.median(times[k])) for k in variants)
    amp = (", bf16 autocast, channels_last" if cuda else "") + (
        ", torch.compile" if compiled else ""
    )
    rows = [
        f"| step (ResNet-50, 224-px image + 9 x 64-px patches per sample, batch {batch}{amp}) "
        f"| {'wall' if cuda else 'CPU'} s per step | images/s | ratio to bare |",
        "|---|---|---|---|",
        f"| bare trunk forward + backward | {t_bare:.3f} | {batch / t_bare:.1f} | 1.00 |",
        f"| full PIRL step (augment, heads, NCE at 32,000 negatives, bank update, SGD) | "
        f"{t_full:.3f} | {batch / t_full:.1f} | {t_full / t_bare:.3f} |",
        f"| the step's parts beyond the trunk timed alone (bare + these: the step without "
        f"the noise of two large timings) | {t_extra:.4f} | - | {1 + t_extra / t_bare:.3f} |",
        *copy_rows,
    ]
    return rows, batch / t_full


def loading_rows(step_images_s: float, n: int = 96, workers: int | None = None) -> list[str]:
    """JPEG decode + crops through a DataLoader, batched path and PIL path."""
    workers = workers or min(4, os.cpu_count() or 1)
    geo = JigsawGeometry()
    rows = [
        f"| loader ({workers} workers, JPEG 500x375, batch 16) | images/s | "
        "vs full step images/s |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train" / "photos"
        root.mkdir(parents=True)
        for i, im in enumerate(photos(n)):
            im.save(root / f"{i:04d}.jpg", quality=90)
        images = list_images(root.parent)
        for name, transform in (
            ("batched path: decode + two crops", CropTransform(geo)),
            ("PIL path: decode + full augmentation", PirlTransform(geo)),
        ):
            loader = torch.utils.data.DataLoader(
                ImageDataset(images, transform),
                batch_size=16,
                num_workers=workers,
                collate_fn=collate_skipping,
                persistent_workers=True,
            )
            for _ in loader:  # start the workers and warm their caches
                pass
            t = time.perf_counter()
            for _ in range(2):
                for _ in loader:
                    pass
            rate = 2 * n / (time.perf_counter() - t)
            rows.append(f"| {name} | {rate:.0f} | {rate / step_images_s:.1f}x |")
    return rows


def gpu_rows(device: torch.device, batch: int = 256) -> list[str]:
    """On the GPU: the batch ops' throughput and the loss + bank at batch 8 and at `batch`."""
    geo = JigsawGeometry()
    crop = CropTransform(geo)
    crops = [crop(im) for im in photos(64)]
    times = -(-batch // len(crops))
    images = torch.stack([a for a, _ in crops] * times)[:batch].to(device)
    sources = torch.stack([b for _, b in crops] * times)[:batch].to(device)
    aug = BatchAugment(geo)
    gen = torch.Generator().manual_seed(0)
    wall, _ = timed(lambda: aug(images, sources, gen), reps=10, sync=True)
    rows = [
        "| on the GPU | wall s | samples/s |",
        "|---|---|---|",
        f"| batch ops (jigsaw cut, jitter, photometric ops, gray, flip, norm), batch {batch} "
        f"| {wall:.4f} | {batch / wall:,.0f} |",
    ]
    memory = MemoryBank(IMAGENET, 128, seed=0).to(device)
    neg_gen = torch.Generator(device).manual_seed(4)
    for n in (8, batch):
        f0 = F.normalize(torch.randn(n, 128, device=device), dim=1)
        g0 = F.normalize(torch.randn(n, 128, device=device), dim=1)
        idx = torch.randint(0, IMAGENET, (n,), device=device)
        for label, shared, dense in (
            ("per sample, blocked gather", False, 0),
            ("per sample, dense scores (default on a GPU)", False, pirl.memory.DENSE_GPU),
            ("--shared-negatives", True, pirl.memory.DENSE_GPU),
        ):
            crit = PirlLoss(memory, NEGATIVES, 0.07, 0.5, "nce", shared_negatives=shared)
            default, pirl.memory.DENSE_GPU = pirl.memory.DENSE_GPU, dense
            try:
                wall, _ = timed(partial(our_step, crit, f0, g0, idx, neg_gen), 10, sync=True)
            finally:
                pirl.memory.DENSE_GPU = default
            rows.append(
                f"| loss + memory, batch {n}, {label}, float32 bank | {wall:.4f} | "
                f"{n / wall:,.0f} |"
            )
    return rows


def run(step_batches: tuple[int, ...] | None = None) -> str:
    """Measure everything once and return the Markdown section for BENCHMARKS.md."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = step_batches or ((256,) if cuda else (1,))
    torch.backends.cudnn.benchmark = True  # fixed shapes, as in training
    t0 = time.perf_counter()
    aug_rows, aug_speedup = augmentation_rows()
    lm_rows = loss_memory_rows()
    startup = startup_seconds()
    threads = torch.get_num_threads()
    if device.type == "cpu":  # one thread: OpenMP spin-waits inflate CPU time on a busy machine
        torch.set_num_threads(1)
    try:
        st_rows: list[str] = []
        runs = [(b, False) for b in batches] + ([(batches[-1], True)] if cuda else [])
        step_rate = 0.0  # the fastest step, for the loader comparison
        for batch, compiled in runs:
            rows, rate = step_rows(device, batch, 10 if cuda else 5, compiled)
            step_rate = max(step_rate, rate)
            st_rows += [*rows, ""]
    finally:
        torch.set_num_threads(threads)
    ld_rows = loading_rows(step_rate)
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    return "\n".join(
        [
            f"## PIRL pretraining step (bench/pretrain_step.py) on {where}",
            "",
            f"One run on {time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} torch threads, "
            f"{time.perf_counter() - t0:.0f} s in all. Targets: batched augmentation >= 10x "
            "the PIL path per core, loss + memory <= 0.03 s per batch of 8, start-up < 2 s, "
            "full step <= 1.05x a bare trunk forward + backward. Reproduce: "
            "`python -m bench.pretrain_step` (or `make bench`).",
            "",
            "### Augmentation per core",
            "",
            *aug_rows,
            "",
            "### Loss + memory bank (1,281,167 entries, 32,000 negatives, batch 8, 2 terms)",
            "",
            *lm_rows,
            "",
            "### Start-up",
            "",
            f"Memory bank for {IMAGENET:,} entries and the first negative draw: "
            f"{startup[0]:.2f} s wall, {startup[1]:.2f} s CPU over "
            f"{torch.get_num_threads()} threads (no sampler object: negatives are one "
            "vectorised draw per term and step).",
            "",
            f"### Step overhead ({device.type}{'' if cuda else ', 1 thread'})",
            "",
            *st_rows,
            *(["### On the GPU", "", *gpu_rows(device), ""] if cuda else []),
            "### Data loading against the step",
            "",
            *ld_rows,
            "",
            f"(augmentation speed-up {aug_speedup:.1f}x; step {step_rate:.1f} images/s)",
        ]
    )


if __name__ == "__main__":
    print(run())
