"""PIRL / NPID++ pretraining, top to bottom: config, model, step, the epoch loop (which also
trains the Jigsaw baseline of pirl/jigsaw_pretext.py), the kNN monitor and the summary.

Run with `pirl-tools pretrain ...`, `pirl-tools pretrain --nproc K ...`, or
`torchrun --nproc_per_node K -m pirl_tools pretrain ...` (same flags). The run folder, resume,
DDP and the finite-loss stop are the engine's (pirl/engine.py).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pirl.augment import (
    PHOTOMETRIC_P,
    BatchAugment,
    CropTransform,
    DeviceDecode,
    EncodedTransform,
    PhotometricSpec,
    require_gpu_decode,
)
from pirl.data import (
    ImageDataset,
    cache_dir,
    collate_skipping,
    embedded_root,
    list_images,
)
from pirl.engine import (
    RunDir,
    epoch_loader,
    epoch_seed,
    param_groups,
    progress,
    rank_batch,
    require_at_least,
    resolve_device,
    seed_everything,
    setup_distributed,
    wrap_ddp,
)
from pirl.errors import UserError
from pirl.heads import PirlHeads
from pirl.invariance import JigsawViews, heads_invariance
from pirl.jigsaw import PATCH_AUGMENTS, JigsawGeometry, NpidTransform, PirlTransform
from pirl.jigsaw_pretext import JigsawTrainer
from pirl.knn import trunk_knn
from pirl.memory import BANK_DTYPES, MemoryBank
from pirl.nce import EPS, PirlLoss
from pirl.plots import plot_learning_curve
from pirl.pretext import CHECKPOINT_VERSION, PretextTrainer
from pirl.trunk import Trunk, build_trunk
from pirl.weights import save_safetensors, save_torchvision

log = logging.getLogger(__name__)

# lambda of the PIRL loss; npid is NPID++; jigsaw, the Jigsaw-pretext baseline, uses the
# patches only and classifies their permutation (pirl/jigsaw_pretext.py) instead of contrasting.
METHODS = {"pirl": 0.5, "npid": 0.0, "jigsaw": 1.0}
# batched: workers only crop, the rest runs on whole batches on the device (pirl/augment.py);
# pil: the per-image PIL pipeline, kept for comparison. The jigsaw baseline keeps its own.
AUGMENTS = ("batched", "pil")
LR_INTERVALS = ("epoch", "step")
# Where the batched path's JPEGs are decoded: gpu (nvJPEG, workers only read bytes), cpu
# (libjpeg-turbo in the workers); auto is cpu until the nvJPEG path has passed
# tests/test_cuda.py on a GPU (pirl/decode.py).
DECODES = ("auto", "cpu", "gpu")
# Published recipe (docs/reference.md) and the small embedded default that runs on a laptop.
PAPER = {
    "arch": "resnet50",
    "width": 1.0,
    "image_size": 224,
    "epochs": 800,
    "batch_size": 1024,
    "num_negatives": 32000,
    "loss": "nce",
    "temperature": 0.07,
    "eval_every": 0,
    "crop_scale": 0.08,
    "hue": 0.2,
    "photometric": PHOTOMETRIC_P,
    "patch_augment": "independent",
    "bank_init_ranks": 32,  # the paper's run: 32 GPUs
}
# 1,437 images: a bank refreshed every 22 steps with a random net's near-collinear embeddings
# makes NCE's fixed Z blow up on so short a run, so the demo uses InfoNCE and fewer negatives.
EMBEDDED = {
    "arch": "resnet18",
    "width": 0.25,
    "image_size": 32,
    "epochs": 100,
    "batch_size": 64,
    "num_negatives": 1024,
    "loss": "infonce",
    "temperature": 0.2,
    "lr": 0.06,
    "eval_every": 10,
    "crop_scale": 0.5,
    "hue": 0.0,
    "photometric": 0.0,
    "patch_augment": "none",
    "bank_init_ranks": 1,
}
# metrics.csv's loss columns: the total, and PIRL's two terms on their own (empty where a method
# has no such term: NPID++ has no patch term, the Jigsaw baseline neither).
TERMS = ("loss", "patch_loss", "image_loss")
# The Jigsaw baseline's own recipe (pirl/jigsaw_pretext.py, VISSL's ResNet Jigsaw config): LR 0.1 x
# batch / 256 on VISSL's step schedule, and at paper scale 105 epochs at batch 256. Its augmentation
# is VISSL's Jigsaw augmentation, which has none of AUGMENT_KEYS.
JIGSAW_PAPER = {"epochs": 105, "batch_size": 256, "lr_schedule": "steps"}
JIGSAW_EMBEDDED = {"lr_schedule": "steps"}
AUGMENT_KEYS = ("crop_scale", "hue", "photometric", "patch_augment")
LR_SCHEDULES = ("cosine", "steps")
# NPID++'s augmentation: VISSL's NPID++ config's (the default with --data), or PIRL's image view
# (the default without: the embedded recipe's colour settings hold for it too).
NPID_AUGMENTS = ("vissl", "pirl")
NPID_DEFAULT = {True: "vissl", False: "pirl"}
# VISSL's Jigsaw schedule, as fractions of its 105 epochs: a linear warm-up from a quarter of the
# LR over the first 5, then the LR divided by 10 at epochs 30, 60, 90 and 100.
WARMUP, WARMUP_START = 5 / 105, 0.25
MILESTONES = (30 / 105, 60 / 105, 90 / 105, 100 / 105)
KNN_K = 20  # the kNN monitor's neighbours (votes exp(s / 0.07), as NPID's)
# metrics.csv's monitor columns (KnnMonitor), empty in the epochs it does not score.
MONITORED = ("knn_top1", "fg_retrieval", "fg_ratio")
TRUNK_EXPORTS = ("trunk.pth", "trunk.safetensors")  # written at the end of pretraining


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run; None fields resolve to PAPER or EMBEDDED defaults."""

    data: str | None = None
    out: str = "runs/pretrain"
    method: str = "pirl"
    arch: str | None = None
    width: float | None = None
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    final_lr_ratio: float = 1e-3
    lr_interval: str = "epoch"  # the LR updated once per epoch as VISSL; "step" every step
    lr_schedule: str | None = None  # cosine (PIRL, NPID++) or steps (the Jigsaw baseline's)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_negatives: int | None = None
    temperature: float | None = None
    lam: float | None = None
    loss: str | None = None
    z_momentum: float = 0.0
    bank_momentum: float = 0.5
    bank_init_ranks: int | None = None  # the starting bank of VISSL on this many GPUs
    embed_dim: int = 128
    num_permutations: int = 2000  # jigsaw: size of the maximal-Hamming permutation set
    crop_scale: float | None = None  # smallest area fraction of the image view's random crop
    hue: float | None = None  # colour jitter's hue range (brightness/contrast/saturation 0.4)
    photometric: float | None = None  # probability of VISSL's random photometric ops
    patch_augment: str | None = None  # each patch its own draw (VISSL), one per image, or none
    npid_augment: str | None = None  # npid: VISSL's NPID++ augmentation, or PIRL's image view
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    amp: bool = True
    compile: bool = False  # torch.compile the model: fused kernels on a GPU, slow first step
    augment: str = "batched"
    decode: str = "auto"  # where the batched path decodes JPEGs: auto, cpu or gpu
    shared_negatives: bool = False  # one draw of N negatives per batch; VISSL draws per sample
    patch_bn_stats: bool = False  # fold the patch pass into BN's running statistics, as VISSL
    bank_dtype: str = "float32"
    skip_bad_images: bool = False
    resume: bool = False
    overwrite: bool = False  # replace an existing run in `out`
    allow_change: tuple[str, ...] = ()  # settings a --resume may change (e.g. epochs)
    logger: str = "none"  # metrics also to tensorboard or wandb (pirl/loggers.py)
    save_every: int = 0  # also keep checkpoint_epoch{E}.pth every N epochs (0: never)
    # kNN monitor: every eval_every epochs (0: never), top-1 of the trunk on val_data/val with
    # val_data/train as the labelled neighbours (the embedded set's split by default).
    eval_every: int | None = None
    val_data: str | None = None

    def resolved(self) -> PretrainConfig:
        """Fill every None from the paper (given --data) or the embedded default (no --data)."""
        base = dict(PAPER if self.data else EMBEDDED)
        if self.method == "jigsaw":
            refuse_given(
                self,
                AUGMENT_KEYS,
                "the Jigsaw baseline trains on VISSL's Jigsaw augmentation (resize, flip, crop, "
                "grayscale 0.66), which has no resized crop, colour jitter or photometric ops",
            )
            for key in AUGMENT_KEYS:
                del base[key]
            base.pop("lr", None)  # 0.1 x batch / 256, below
            base.update(JIGSAW_PAPER if self.data else JIGSAW_EMBEDDED)
        else:
            base["lr_schedule"] = "cosine"
        if (
            self.method == "npid"
            and (self.npid_augment or NPID_DEFAULT[bool(self.data)]) == "vissl"
        ):
            unused = ("hue", "photometric", "patch_augment")
            refuse_given(
                self,
                unused,
                "NPID++ trains on VISSL's NPID++ augmentation (jitter with hue 0.4, crop, flip); "
                "--npid-augment pirl gives it PIRL's image view",
            )
            for key in unused:
                del base[key]
        cfg = dataclasses.replace(self)
        for key, value in base.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.data is None:
            cfg.data = str(embedded_root(cfg.image_size) / "train")
            cfg.val_data = cfg.val_data or str(embedded_root(cfg.image_size))
        if cfg.eval_every and cfg.val_data is None:
            raise UserError(
                f"--eval-every {cfg.eval_every}: the kNN monitor needs --val-data DIR "
                "(DIR/train and DIR/val, labelled image folders)"
            )
        if cfg.lam is None:
            if cfg.method not in METHODS:
                raise UserError(f"--method {cfg.method}: choose from {sorted(METHODS)}")
            cfg.lam = METHODS[cfg.method]
        if cfg.lr is None:
            cfg.lr = (0.1 if cfg.method == "jigsaw" else 0.03) * cfg.batch_size / 256
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule {cfg.lr_schedule}: choose from {list(LR_SCHEDULES)}")
        if cfg.patch_augment is not None and cfg.patch_augment not in PATCH_AUGMENTS:
            raise UserError(
                f"--patch-augment {cfg.patch_augment}: choose from {list(PATCH_AUGMENTS)}"
            )
        if cfg.method == "npid":
            cfg.npid_augment = cfg.npid_augment or NPID_DEFAULT[bool(self.data)]
            if cfg.npid_augment not in NPID_AUGMENTS:
                raise UserError(
                    f"--npid-augment {cfg.npid_augment}: choose from {list(NPID_AUGMENTS)}"
                )
        elif cfg.npid_augment is not None:
            raise UserError(f"--npid-augment {cfg.npid_augment}: only for --method npid")
        if cfg.augment not in AUGMENTS:
            raise UserError(f"--augment {cfg.augment}: choose from {list(AUGMENTS)}")
        if cfg.decode not in DECODES:
            raise UserError(f"--decode {cfg.decode}: choose from {list(DECODES)}")
        if cfg.decode == "gpu" and (not batched(cfg) or cfg.method == "jigsaw"):
            raise UserError(
                "--decode gpu: only the batched augmentation of pirl/npid decodes there"
            )
        if cfg.lr_interval not in LR_INTERVALS:
            raise UserError(f"--lr-interval {cfg.lr_interval}: choose from {list(LR_INTERVALS)}")
        if cfg.bank_dtype not in BANK_DTYPES:
            raise UserError(f"--bank-dtype {cfg.bank_dtype}: choose from {list(BANK_DTYPES)}")
        require_at_least(
            1,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            num_negatives=cfg.num_negatives,
            image_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            bank_init_ranks=cfg.bank_init_ranks,
        )
        require_at_least(
            0, num_workers=cfg.num_workers, eval_every=cfg.eval_every, save_every=cfg.save_every
        )
        if cfg.lr <= 0:
            raise UserError(f"--lr {cfg.lr}: must be positive")
        return cfg


def refuse_given(cfg: PretrainConfig, keys: tuple[str, ...], why: str) -> None:
    """One line for the first of these settings the user gave that the recipe would ignore."""
    for key in keys:
        if getattr(cfg, key) is not None:
            raise UserError(f"--{key.replace('_', '-')} {getattr(cfg, key)}: {why}")


class PirlModel(nn.Module):
    """Shared trunk + heads: the patches pass first, then the image, each its own BN batch, in
    VISSL's INPUT_KEY_NAMES order (patches, images).

    BN's running statistics, which every frozen-trunk evaluation of images uses, are the image
    batches' alone: the patch pass normalises by its batch but leaves them as they are. VISSL
    folds both passes in (patch_bn_stats), which at momentum 0.1 leaves them about 47% patch
    statistics; at 32 px that costs the image's kNN top-1 about 5 points (docs/reference.md).
    """

    def __init__(self, trunk: Trunk, heads: PirlHeads, patch_bn_stats: bool = False) -> None:
        super().__init__()
        self.trunk, self.heads, self.patch_bn_stats = trunk, heads, patch_bn_stats
        # found once, not on every step (a plain list: not registered as submodules again)
        self._norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(
        self, images: torch.Tensor, patches: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = None
        if patches is not None:
            flat = patches.flatten(0, 1)
            if flat.is_cuda:  # as the images (device_views): cuDNN's fast layout under AMP
                flat = flat.contiguous(memory_format=torch.channels_last)
            with (
                contextlib.nullcontext() if self.patch_bn_stats else frozen_statistics(self._norms)
            ):
                g = self.heads.g(self.trunk.pooled(flat))
        return self.heads.f(self.trunk.pooled(images)), g


@contextlib.contextmanager
def frozen_statistics(norms: list[nn.Module]) -> Iterator[None]:
    """Inside, these BN layers in training normalise by the batch but keep their running
    statistics (momentum 0: running <- running)."""
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


def step_lr(done: float, base: float) -> float:
    """VISSL's Jigsaw schedule at `done` (fraction of the run behind us): warm-up from
    WARMUP_START x base to base over WARMUP, then base / 10 at each milestone passed."""
    if done < WARMUP:
        return base * (WARMUP_START + (1 - WARMUP_START) * done / WARMUP)
    return base * 0.1 ** sum(done >= m for m in MILESTONES)


def cosine_lr(done: float, base: float, final_ratio: float) -> float:
    """Cosine from base (done = 0) to base * final_ratio (done = 1), done being the fraction
    of the run behind us: epoch / epochs as VISSL updates it, or step / steps per step."""
    final = base * final_ratio
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(done, 1.0)))


class PirlTrainer(PretextTrainer):
    """PIRL / NPID++: the memory bank of image embeddings and the NCE (or InfoNCE) loss against
    its negatives; the image view's embedding f(v_I) and, for PIRL, the patches' g(v_I^t)."""

    memory: MemoryBank
    augment: BatchAugment | None
    device_decode: DeviceDecode | None

    @classmethod
    def build(cls, cfg: PretrainConfig, data_size: int, device: torch.device) -> PirlTrainer:
        """Model, bank, loss and SGD from the resolved config."""
        torch.manual_seed(cfg.seed)
        trunk = build_trunk(cfg.arch, cfg.width)
        heads = PirlHeads(trunk.out_dim, cfg.embed_dim)
        model = PirlModel(trunk, heads, cfg.patch_bn_stats).to(device)
        dtype = BANK_DTYPES[cfg.bank_dtype]
        memory = MemoryBank(
            data_size, cfg.embed_dim, cfg.bank_momentum, cfg.seed, dtype, cfg.bank_init_ranks
        ).to(device)
        criterion = PirlLoss(
            memory,
            cfg.num_negatives,
            cfg.temperature,
            cfg.lam,
            cfg.loss,
            cfg.z_momentum,
            cfg.shared_negatives,
        ).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(  # fused: one pass over the weights
            param_groups(model, cfg.weight_decay, decay_bias=cfg.method == "npid"),
            lr=cfg.lr,
            momentum=cfg.momentum,
            fused=True,
        )
        trainer = cls(cfg, model, criterion, optimizer)
        trainer.memory = memory
        trainer.augment, trainer.device_decode = None, None
        if batched(cfg):
            geometry = JigsawGeometry.for_image_size(cfg.image_size)
            spec = PhotometricSpec(hue=cfg.hue, photometric=cfg.photometric)
            trainer.augment = BatchAugment(geometry, spec, cfg.patch_augment)
            if cfg.decode == "gpu":
                require_gpu_decode(device)
                crops = CropTransform(geometry, cfg.lam > 0, cfg.crop_scale)
                trainer.device_decode = DeviceDecode(crops)
        return trainer

    def invariance_heads(self) -> PirlHeads | None:
        """The heads whose f-g invariance the monitor reports: only a run with a patch term
        trains g (NPID++'s g stays as initialised)."""
        return self.model.heads if self.cfg.lam > 0 else None

    def memory_state(self) -> dict[str, Any]:
        return {"bank": self.memory.bank, "momentum": self.memory.momentum}

    def load_memory(self, state: dict[str, Any] | None) -> None:
        self.memory.bank.copy_(state["bank"])

    def remember(self, idx: torch.Tensor, embedding: torch.Tensor) -> None:
        self.memory.update(idx, embedding)

    def transform(self) -> CropTransform | EncodedTransform | PirlTransform | NpidTransform:
        """What the loader's workers make of each image: only the crops (batched augmentation
        on the device), or the whole per-image PIL pipeline."""
        cfg = self.cfg
        geometry = JigsawGeometry.for_image_size(cfg.image_size)
        if cfg.npid_augment == "vissl":
            return NpidTransform(cfg.image_size, cfg.crop_scale)
        if cfg.augment == "pil":
            return PirlTransform(
                geometry, cfg.lam > 0, cfg.crop_scale, cfg.hue, cfg.photometric, cfg.patch_augment
            )
        if self.device_decode is not None:  # workers read bytes and draw boxes; nvJPEG decodes
            return EncodedTransform(geometry, cfg.lam > 0, cfg.crop_scale)
        return CropTransform(geometry, cfg.lam > 0, cfg.crop_scale)

    def chance_loss(self, data_size: int) -> float:
        """The loss of a model that cannot tell the positive from the negatives (all scores
        equal): log(1 + N) for InfoNCE; for NCE, with Z = |D| exp(s) so that P = 1 / |D|,
        c = N / |D| and VISSL's eps, log(1 + N + eps |D|) + N log((1 + N + eps |D|) / N)."""
        n = self.cfg.num_negatives
        if self.cfg.loss == "infonce":
            return math.log1p(n)
        total = 1 + n + EPS * data_size
        return math.log(total) + n * math.log(total / n)

    def loss(
        self,
        model: nn.Module,
        views: tuple[torch.Tensor, ...],
        idx: torch.Tensor,
        neg_gen: torch.Generator,
        aug_gen: torch.Generator,
        amp: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss on the batch (model: self.model or its DDP wrapper), the image
        embeddings the bank takes after the update, and each term's loss (detached)."""
        if self.device_decode is not None:
            views = self.device_decode(views, idx.device)
        images, patches = device_views(views, self.augment, idx.device, aug_gen, self.cfg.lam > 0)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            f, g = model(images, patches)
        f = f.float()
        terms = self.criterion.terms(f, None if g is None else g.float(), idx, neg_gen)
        return self.criterion.mix(terms), f.detach(), {k: v.detach() for k, v in terms.items()}


def _to_device(x: Any, device: torch.device) -> Any:
    """Every tensor in nested lists/tuples moved to device without blocking the host."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def prefetched(loader: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """The loader's (batch, skipped) items with their tensors already on a CUDA device:
    batch i+1 crosses on a side stream while step i computes, so the copy costs the step
    nothing. Elsewhere the loader as it is."""
    if device.type != "cuda":
        yield from loader
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def send(item: Any) -> tuple[Any, torch.cuda.Event | None]:
        batch, skipped = item
        if batch is None:
            return item, None
        with torch.cuda.stream(side):
            moved = _to_device(batch, device)
            done = side.record_event()
        for t in _tensors(moved):  # used on the main stream: not to be reused before that
            t.record_stream(main)
        return (moved, skipped), done

    def arrived(sent: tuple[Any, torch.cuda.Event | None]) -> Any:
        if sent[1] is not None:
            main.wait_event(sent[1])
        return sent[0]

    pending = None
    for item in loader:
        ready = send(item)  # issue the next copy before handing out the current batch
        if pending is not None:
            yield arrived(pending)
        pending = ready
    if pending is not None:
        yield arrived(pending)


def device_views(
    views: tuple[torch.Tensor, ...],
    augment: BatchAugment | None,
    device: torch.device,
    generator: torch.Generator,
    with_patches: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, patches or None) on the device: the PIL path's tensors as they are, or the
    batched path's uint8 crops augmented there (only uint8 crosses to the GPU)."""
    images, patches = views[0].to(device, non_blocking=True), None
    if with_patches:
        patches = views[1].to(device, non_blocking=True)
    if augment is not None:
        images, patches, _ = augment(images, patches, generator)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, patches


class KnnMonitor:
    """What a run has learned so far, on the labelled split cfg.val_data/val (a frozen copy of the
    trunk: the trunk trains on): kNN top-1 (%) with cfg.val_data/train as the neighbours and, for a
    run with a patch term, its heads' invariance to the jigsaw transform (pirl/invariance.py): how
    often g of an image's jigsaw view retrieves f of the same image (%, chance 100 / images), and
    the f-g distance to the own image over that to the others (1: no invariance)."""

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        root = Path(cfg.val_data)
        self.splits = (list_images(root / "train"), list_images(root / "val"))
        for split in self.splits:
            if min(split.labels) < 0:
                raise UserError(f"{split.root}: the kNN monitor needs class sub-folders")
        self.cfg, self.device = cfg, device

    def __call__(self, trunk: Trunk, heads: PirlHeads | None = None) -> dict[str, float]:
        """{"knn_top1": ...} and, given heads, {"fg_retrieval": ..., "fg_ratio": ...}."""
        common = {
            "device": self.device,
            "batch_size": 256,
            "num_workers": self.cfg.num_workers,
            "progress": False,
            "alone": True,  # rank 0 only: the other ranks wait at the next step's all-reduce
        }
        trunk = copy.deepcopy(trunk)
        acc = trunk_knn(trunk, *self.splits, "res5avg", self.cfg.image_size, (KNN_K,), **common)
        out = {"knn_top1": acc[KNN_K]}
        if heads is not None:
            size, workers = self.cfg.image_size, self.cfg.num_workers
            views = JigsawViews.build(trunk, self.splits[1], size, 0, self.device, 256, workers)
            inv = heads_invariance(views, copy.deepcopy(heads), **common)
            out.update(fg_retrieval=100.0 * inv.self_match, fg_ratio=inv.ratio)
        return out

    @property
    def retrieval_chance(self) -> float:
        """fg_retrieval (%) of heads that cannot tell the images apart."""
        return 100.0 / len(self.splits[1])


def batched(cfg: PretrainConfig) -> bool:
    """Whether the views are augmented on the device in batches (pirl/augment.py): PIRL's
    augmentation with --augment batched; NPID++'s reference augmentation runs per image."""
    return cfg.augment == "batched" and cfg.npid_augment != "vissl"


def decoding(cfg: PretrainConfig) -> str:
    """Where this invocation decodes its JPEGs, --decode auto resolved (run.json records it:
    it may differ between a run and its resume)."""
    if cfg.method == "jigsaw" or not batched(cfg):
        return "workers: PIL"
    return "gpu: nvJPEG" if cfg.decode == "gpu" else "workers: libjpeg-turbo"


def make_trainer(
    cfg: PretrainConfig, data_size: int, device: torch.device
) -> PirlTrainer | JigsawTrainer:
    """The method's trainer (PIRL / NPID++ here, the Jigsaw baseline its own) from the
    resolved config."""
    if cfg.method == "jigsaw":
        return JigsawTrainer.build(cfg, device)
    return PirlTrainer.build(cfg, data_size, device)


def pretrain(cfg: PretrainConfig) -> PirlTrainer | JigsawTrainer:
    """Run (or resume) pretraining; rank 0 writes checkpoint.pth and metrics.csv each epoch,
    checkpoint_epoch{E}.pth every --save-every epochs and the trunk exports at the end."""
    rank, world_size, device = setup_distributed(cfg.device)
    cfg = cfg.resolved()
    rank_batch(cfg.batch_size)  # a batch the processes cannot share: refused before any work
    if cfg.decode == "gpu":
        require_gpu_decode(device)  # before the folder is claimed (or an old run overwritten)
    images = list_images(cfg.data)
    run = RunDir(cfg.out)
    run.start(
        "pretrain",
        dataclasses.asdict(cfg),
        device,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        allow_change=cfg.allow_change,
        record={"decode": decoding(cfg)},
        logger=cfg.logger,
    )
    if cfg.num_negatives > len(images) and rank == 0 and cfg.method != "jigsaw":
        log.warning(
            "%d negatives from %d images: each is drawn about %.0f times per sample",
            cfg.num_negatives,
            len(images),
            cfg.num_negatives / len(images),
        )
    trainer = make_trainer(cfg, len(images), device)
    monitor = KnnMonitor(cfg, device) if cfg.eval_every and rank == 0 else None
    if cfg.resume:
        run.restore(trainer.load)
        if rank == 0:
            log.info("resuming %s at epoch %d (step %d)", cfg.out, trainer.epoch, trainer.step)
    model = wrap_ddp(trainer.model, device)
    if cfg.compile:
        model = torch.compile(model)
    dataset = ImageDataset(images, trainer.transform(), skip_bad=cfg.skip_bad_images)
    loader_args = (cfg.batch_size, cfg.seed)
    total = len(epoch_loader(dataset, *loader_args, 0, 0)) * cfg.epochs
    amp = cfg.amp and device.type == "cuda"
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: drop_last batches
    trained = trainer.epoch < cfg.epochs
    while trainer.epoch < cfg.epochs:
        epoch = trainer.epoch
        seed_everything(epoch_seed(cfg.seed, epoch, rank))
        # Negatives are drawn on the training device: B*N indices per term need not cross.
        # Each rank draws its own, as VISSL's per-rank seeds do.
        neg_gen = torch.Generator(device).manual_seed(epoch_seed(cfg.seed + 1, epoch, rank))
        aug_gen = torch.Generator().manual_seed(epoch_seed(cfg.seed + 2, epoch, rank))
        loader = epoch_loader(dataset, *loader_args, epoch, cfg.num_workers, collate_skipping)
        model.train()
        seen, skipped, t0 = 0, 0, time.perf_counter()
        sums: dict[str, float] = {}  # the loss and each term's, summed over the images
        bar = progress(
            prefetched(loader, device), total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}"
        )
        for batch, n_bad in bar:
            skipped += n_bad
            if batch is None:
                continue
            views, _labels, idx = batch
            idx = idx.to(device)
            done = epoch / cfg.epochs if cfg.lr_interval == "epoch" else trainer.step / total
            if cfg.lr_schedule == "steps":
                lr = step_lr(done, cfg.lr)
            else:
                lr = cosine_lr(done, cfg.lr, cfg.final_lr_ratio)
            loss, embedding, terms = trainer.loss(model, views, idx, neg_gen, aug_gen, amp)
            # The step's one host sync: the loss and its terms, for the finite check and logs.
            values = torch.stack([loss.detach(), *terms.values()]).tolist()
            value = values[0]
            run.check_finite(value, f"epoch {epoch + 1}, step {trainer.step}", device)
            trainer.update(loss, lr, idx, embedding)
            trainer.step += 1
            seen += len(idx)
            for key, v in zip(("loss", *(f"{t}_loss" for t in terms)), values, strict=True):
                sums[key] = sums.get(key, 0.0) + v * len(idx)
            rate = seen * world_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.0f}")
        if world_size > 1:  # every rank stops if any saw no readable image
            least = torch.tensor(float(seen), device=device)
            dist.all_reduce(least, op=dist.ReduceOp.MIN)
            seen_anywhere = least.item() > 0
        else:
            seen_anywhere = seen > 0
        if not seen_anywhere:  # before any checkpoint: an epoch with nothing learned is not saved
            raise UserError(
                f"{cfg.data}: no readable image in epoch {epoch + 1} ({skipped} skipped of "
                f"{len(images)}); nothing to train on"
            )
        trainer.epoch += 1
        seconds = time.perf_counter() - t0
        if rank == 0:
            state = trainer.state()
            run.save_checkpoint(state)
            if cfg.save_every and trainer.epoch % cfg.save_every == 0:
                run.save_checkpoint(state, snapshot_name(trainer.epoch))
            monitored = dict.fromkeys(MONITORED)
            if monitor is not None and (
                trainer.epoch % cfg.eval_every == 0 or trainer.epoch == cfg.epochs
            ):
                monitored.update(monitor(trainer.model.trunk, trainer.invariance_heads()))
            row = {
                "epoch": trainer.epoch,
                "step": trainer.step,
                **{k: sums[k] / seen if k in sums else None for k in TERMS},
                "lr": lr,
                "images_per_s": seen * world_size / seconds,
                "seconds": round(seconds, 2),
                "skipped_images": skipped,
                **monitored,
            }
            run.append_metrics(row)
            log.info(
                "epoch %d/%d %s %.0f img/s%s%s",
                trainer.epoch,
                cfg.epochs,
                describe_losses(row),
                row["images_per_s"],
                describe_monitor(row),
                f" ({skipped} unreadable images skipped)" if skipped else "",
            )
    if rank == 0 and (trained or not run.path(TRUNK_EXPORTS[0]).exists()):
        export_trunk(run, trainer.model.trunk)
    if rank == 0 and (trained or not run.path("results.json").exists()):
        summarize(cfg, run, monitor, trainer, trainer.chance_loss(len(images)))
    return trainer


def snapshot_name(epoch: int) -> str:
    """The file of the --save-every snapshot after `epoch` epochs (checkpoint.pth's layout)."""
    return f"checkpoint_epoch{epoch}.pth"


def describe_losses(row: dict[str, Any]) -> str:
    """The loss and, where a method has them, PIRL's two terms, for the log line."""
    terms = [f"{t.split('_')[0]} {row[t]:.3f}" for t in TERMS[1:] if row.get(t) is not None]
    return f"loss {row['loss']:.4f}" + (f" ({', '.join(terms)})" if terms else "")


def describe_monitor(row: dict[str, Any]) -> str:
    """What the monitor measured this epoch, for the log line ("" when it did not run)."""
    parts = []
    if row.get("knn_top1") is not None:
        parts.append(f"kNN top-1 {row['knn_top1']:.1f}%")
    if row.get("fg_retrieval") is not None:
        parts.append(f"g retrieves f {row['fg_retrieval']:.1f}%, f-g ratio {row['fg_ratio']:.3f}")
    return "".join(f", {p}" for p in parts)


def export_trunk(run: RunDir, trunk: Trunk) -> tuple[Path, Path]:
    """The trained trunk alone in torchvision's layout (no fc), as trunk.pth and
    trunk.safetensors, so torchvision, timm or detectron2 users load it without pirl-tools."""
    state = trunk.state_dict()
    return (
        save_torchvision(state, run.path(TRUNK_EXPORTS[0])),
        save_safetensors(state, run.path(TRUNK_EXPORTS[1])),
    )


def summarize(
    cfg: PretrainConfig,
    run: RunDir,
    monitor: KnnMonitor | None,
    trainer: PirlTrainer | JigsawTrainer,
    chance: float,
) -> dict[str, Any]:
    """results.json and learning_curve.png: the final loss and each of PIRL's terms against
    chance (every term's chance is the same: each contrasts one positive with the same number of
    negatives) and, when monitored, the trunk's kNN top-1 and the heads' invariance against the
    same architecture untrained (the run's own seed): a run shows what it learned."""
    rows = list(csv.DictReader(run.path("metrics.csv").open(newline="")))
    results: dict[str, Any] = {"epochs": cfg.epochs, "chance_loss": chance}
    for key in TERMS:
        if rows[-1].get(key):
            results[f"final_{key}"] = float(rows[-1][key])
    if monitor is not None:
        heads = trainer.invariance_heads()
        last = {k: float(rows[-1][k]) for k in MONITORED if rows[-1].get(k)}
        results.update(last if "knn_top1" in last else monitor(trainer.model.trunk, heads))
        torch.manual_seed(cfg.seed)  # the trunk and heads make_trainer built before any step
        untrained = build_trunk(cfg.arch, cfg.width)
        random_heads = PirlHeads(untrained.out_dim, cfg.embed_dim) if heads is not None else None
        results.update(
            {f"random_{k}": v for k, v in monitor(untrained, random_heads).items()},
            knn_k=KNN_K,
        )
        if heads is not None:
            results["fg_retrieval_chance"] = monitor.retrieval_chance
    run.write_results(results)
    plot_learning_curve(
        run.path("metrics.csv"),
        run.path("learning_curve.png"),
        results["chance_loss"],
        results.get("random_knn_top1"),
        results.get("random_fg_retrieval"),
    )
    final = {key: results.get(f"final_{key}") for key in TERMS}
    line = f"final {describe_losses(final)}; chance {chance:.3f} for every term"
    if monitor is not None:
        line += (
            f"; kNN top-1 {results['knn_top1']:.1f}% (untrained trunk "
            f"{results['random_knn_top1']:.1f}%)"
        )
    if "fg_retrieval" in results:
        line += (
            f"; g retrieves its own image's f {results['fg_retrieval']:.1f}% of the time "
            f"(untrained {results['random_fg_retrieval']:.1f}%, chance "
            f"{results['fg_retrieval_chance']:.1f}%), f-g distance ratio own/other "
            f"{results['fg_ratio']:.3f} (untrained {results['random_fg_ratio']:.3f})"
        )
    log.info("%s", line)
    return results


def embedded_checkpoint(
    method: str = "pirl", device: str = "auto", num_workers: int = 2, **overrides: Any
) -> Path:
    """The embedded pretraining of `method`, trained once into the cache (resumed if it was cut
    short), so every table and analysis that compares against it shares one run."""
    # The recipe and checkpoint version are in the name: a newer recipe trains its own run.
    recipe = (CHECKPOINT_VERSION, sorted(EMBEDDED.items()), sorted(overrides.items()))
    if method == "jigsaw":  # its head and augmentation changed with no checkpoint version
        recipe += ("jigsaw-vissl", sorted(JIGSAW_EMBEDDED.items()))
    tag = f"{method}-{hashlib.sha1(repr(recipe).encode()).hexdigest()[:10]}"
    run = cache_dir() / "pretrained" / tag
    ckpt = run / "checkpoint.pth"
    cfg = PretrainConfig(
        out=str(run),
        method=method,
        device=device,
        num_workers=num_workers,
        resume=ckpt.exists(),
        overwrite=not ckpt.exists(),  # a run killed before its first checkpoint
        **overrides,
    )
    pretrain(cfg)
    return ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, cfg: PretrainConfig) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        pretrain(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain_multiprocess(cfg: PretrainConfig, nproc: int) -> None:
    """Spawn `nproc` local DDP workers (gloo on CPU, nccl on GPU), after the checks that need
    no workers: data, device, run folder."""
    resolved = cfg.resolved()
    list_images(resolved.data)
    resolve_device(resolved.device)
    RunDir(resolved.out).check(
        "pretrain",
        dataclasses.asdict(resolved),
        resume=resolved.resume,
        overwrite=resolved.overwrite,
        allow_change=resolved.allow_change,
    )
    torch.multiprocessing.spawn(_spawned, args=(nproc, free_port(), cfg), nprocs=nproc)
