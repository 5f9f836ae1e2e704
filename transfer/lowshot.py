"""Low-shot semi-supervised fine-tuning (the paper's Table 3): the whole network plus a linear
classifier trained on a class-balanced 1% or 10% of the labels, top-1/top-5 on validation.

Recipe (defaults): SGD Nesterov momentum 0.9, batch 256, LR 0.01 x batch / 256 for trunk and
head (VISSL's auto_scale; the embedded run keeps 0.01 at batch 64), the classifier with
PyTorch's default initialisation, decayed 10x at epoch 30 of 70 (the milestone scales with
--epochs), no weight decay,
RandomResizedCrop + flip for training and Resize(256/224 x) + CenterCrop for validation.

Subsets: class c with n_c training images contributes max(1, round_half_up(percent/100 n_c))
images (or a fixed --per-class count), drawn by a permutation seeded from (seed, c) over its
sorted files, so a run repeats exactly and for one seed the 1% subset lies inside the 10% one.
The chosen files go to subset.txt in the split-file format, so `--split-file subset.txt`
replays them. The run folder is claimed through the run engine (pirl/engine.py): an existing run
is refused without --resume or --overwrite, and --resume refuses changed settings, naming each;
more epochs need `allow_change=("epochs",)` (the LR milestone then follows the new --epochs).
Checkpoints are written atomically each epoch and every epoch's randomness is seeded from
(seed, epoch), so --resume continues exactly (on the CPU) as pirl/pretrain.py does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchvision import transforms as T

from pirl.data import ImageDataset, ImageList, embedded_root, list_images
from pirl.engine import (
    RunDir,
    atomic_write_bytes,
    epoch_loader,
    epoch_seed,
    param_groups,
    progress,
    rank_batch,
    require_at_least,
    seed_everything,
    setup_distributed,
    wrap_ddp,
)
from pirl.engine import world as runs_world
from pirl.errors import UserError
from pirl.features import IMAGENET_MEAN, IMAGENET_STD, center_crop_transform
from pirl.trunk import Trunk
from pirl.weights import load_encoder

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
# Published recipe and the small embedded default that runs in minutes on a CPU.
PAPER = {"epochs": 70, "batch_size": 256, "image_size": 224}
EMBEDDED = {"epochs": 30, "batch_size": 64, "image_size": 64, "lr": 0.01}
LR_PER_256 = 0.01  # VISSL's semi-supervised base LR, scaled by batch / 256
PAPER_MILESTONE = Fraction(30, 70)  # LR / 10 at epoch 30 of 70


# --------------------------------------------------------------------------- subsets


@dataclass
class Subset:
    """Which training images a run uses, and how they came to be chosen."""

    indices: list[int]  # into the training ImageList, sorted
    counts: dict[str, int]  # images used per class
    short: dict[str, dict[str, int]]  # class -> {"asked", "available"} where fewer were there
    source: str  # how it was drawn ("percent 10, seed 0") or the split file read

    def __len__(self) -> int:
        return len(self.indices)


def per_class_count(n: int, percent: float) -> int:
    """percent% of a class, rounded half up (exactly, not in floating point), at least one."""
    share = Fraction(str(percent)) * n / 100
    return max(1, math.floor(share + Fraction(1, 2)))


def _by_class(images: ImageList) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in images.classes]
    for i, y in enumerate(images.labels):
        members[y].append(i)
    return [sorted(m, key=lambda i: images.paths[i].name) for m in members]


def balanced_subset(
    images: ImageList, percent: float, seed: int, per_class: int | None = None
) -> Subset:
    """Draw percent% of every class (or `per_class` images each), seeded per (seed, class)."""
    if not images.classes:
        raise UserError(f"{images.root}: low-shot needs labelled images in class folders")
    if per_class is None and not 0 < percent <= 100:
        raise UserError(f"--percent {percent}: must be in (0, 100]")
    if per_class is not None and per_class < 1:
        raise UserError(f"--per-class {per_class}: must be at least 1")
    chosen: list[int] = []
    counts: dict[str, int] = {}
    short: dict[str, dict[str, int]] = {}
    for c, members in enumerate(_by_class(images)):
        name = images.classes[c]
        asked = per_class if per_class is not None else per_class_count(len(members), percent)
        if asked > len(members):
            short[name] = {"asked": asked, "available": len(members)}
            log.warning(
                "class %s has %d images, fewer than the %d asked for; using all of them",
                name,
                len(members),
                asked,
            )
        order = np.random.default_rng([seed, c]).permutation(len(members))
        picked = [members[j] for j in order[:asked]]
        chosen += picked
        counts[name] = len(picked)
    how = f"{per_class} per class" if per_class is not None else f"{percent:g}% per class"
    return Subset(sorted(chosen), counts, short, f"{how}, seed {seed}")


def _split_key(entry: str) -> tuple[str, str]:
    """(class folder, file name) of a split-file entry: a path, or a name like n0144_10.JPEG."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    name = parts[0]
    return name.split("_", 1)[0] if "_" in name else "", name


def read_split_file(path: str | Path, images: ImageList) -> Subset:
    """Read a list of training images (one path or `<class>_<id>.ext` name per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    index = {
        (images.classes[y], p.name): i
        for i, (p, y) in enumerate(zip(images.paths, images.labels, strict=True))
    }
    chosen: dict[int, int] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if len(entry.split()) != 1:
                raise UserError(
                    f"{path}:{lineno}: expected one image path or file name, got {entry[:80]!r}"
                )
            cls, name = _split_key(entry)
            if not cls:
                raise UserError(
                    f"{path}:{lineno}: {entry!r} names no class: use "
                    "<class>/<file> or a <class>_<id> file name"
                )
            if cls not in images.classes:
                raise UserError(f"{path}:{lineno}: class {cls!r} is not a folder of {images.root}")
            if (cls, name) not in index:
                raise UserError(f"{path}:{lineno}: {name} is not in {images.root / cls}")
            i = index[(cls, name)]
            if i in chosen:
                raise UserError(f"{path}:{lineno}: {entry!r} repeats line {chosen[i]}")
            chosen[i] = lineno
    if not chosen:
        raise UserError(f"{path}: no images listed")
    counts = dict.fromkeys(images.classes, 0)
    for i in chosen:
        counts[images.classes[images.labels[i]]] += 1
    short = {c: {"asked": 1, "available": 0} for c, n in counts.items() if n == 0}
    for c in short:
        log.warning("split file %s lists no image of class %s", path, c)
    return Subset(sorted(chosen), counts, short, str(path))


def write_subset(path: Path, subset: Subset, images: ImageList) -> Path:
    """subset.txt: `<class>/<file>` per line, the format --split-file reads back."""
    lines = [f"{images.classes[images.labels[i]]}/{images.paths[i].name}\n" for i in subset.indices]
    atomic_write_bytes(path, "".join(lines).encode())
    return path


def take(images: ImageList, indices: list[int]) -> ImageList:
    """The ImageList restricted to `indices`, keeping every class (labels stay comparable)."""
    return ImageList(
        images.root,
        [images.paths[i] for i in indices],
        [images.labels[i] for i in indices],
        images.classes,
    )


# --------------------------------------------------------------------------- model, metrics


class FineTuneNet(nn.Module):
    """Trunk, global average pool, linear classifier: the network fine-tuned end to end."""

    def __init__(self, trunk: Trunk, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(trunk.out_dim, num_classes)  # PyTorch's init, as VISSL's mlp keeps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk.pooled(x))


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, per k (k capped at classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def train_transform(size: int, min_crop: float = 0.08) -> T.Compose:
    """RandomResizedCrop (area min_crop..1) + flip at the run's image size, ImageNet-normalised."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(min_crop, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------- training


@dataclass
class LowshotConfig:
    """Every knob of one fine-tuning run; None fields resolve to PAPER or EMBEDDED defaults."""

    weights: str = "random"
    name: str = "random"
    data: str | None = None
    out: str = "runs/lowshot"
    percent: float = 10.0
    per_class: int | None = None
    split_file: str | None = None
    epochs: int | None = None
    milestones: list[int] | None = None
    batch_size: int | None = None
    image_size: int | None = None
    min_crop: float = 0.08
    lr: float | None = None  # 0.01 x batch / 256 (VISSL's auto_scale)
    head_lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    resume: bool = False
    overwrite: bool = False
    allow_change: tuple[str, ...] = ()
    logger: str = "none"  # metrics also to tensorboard or wandb (pirl/loggers.py)

    def resolved(self) -> LowshotConfig:
        """Fill every None from the paper (given --data) or the embedded default (no --data)."""
        cfg = dataclasses.replace(self)
        for key, value in (PAPER if self.data else EMBEDDED).items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        require_at_least(1, epochs=cfg.epochs, batch_size=cfg.batch_size, image_size=cfg.image_size)
        require_at_least(0, num_workers=cfg.num_workers)
        if cfg.data is None:
            cfg.data = str(embedded_root(cfg.image_size))
        if cfg.lr is None:
            cfg.lr = LR_PER_256 * cfg.batch_size / 256
        if cfg.head_lr is None:
            cfg.head_lr = cfg.lr
        if cfg.milestones is None:
            cfg.milestones = [max(1, math.floor(PAPER_MILESTONE * cfg.epochs + Fraction(1, 2)))]
        return cfg


def lr_factor(epoch: int, milestones: list[int]) -> float:
    """LR multiplier in an epoch: 0.1 for every milestone already reached."""
    return 0.1 ** sum(epoch >= m for m in milestones)


def load_data(cfg: LowshotConfig) -> tuple[ImageList, ImageList, Subset]:
    """The labelled training set, the validation set (same class indices) and the subset."""
    root = Path(cfg.data)
    train = list_images(root / "train")
    val = list_images(root / "val")
    if not train.classes:
        raise UserError(f"{root / 'train'}: expected one folder per class (ImageFolder)")
    index = {c: i for i, c in enumerate(train.classes)}
    unknown = [c for c in val.classes if c not in index]
    if unknown or not val.classes:
        what = (
            f"class folder {unknown[0]!r} is not in {root / 'train'}"
            if unknown
            else "expected one folder per class (ImageFolder)"
        )
        raise UserError(f"{root / 'val'}: {what}")
    val = ImageList(val.root, val.paths, [index[val.classes[y]] for y in val.labels], train.classes)
    if cfg.split_file:
        subset = read_split_file(cfg.split_file, train)
    else:
        subset = balanced_subset(train, cfg.percent, cfg.seed, cfg.per_class)
    return train, val, subset


@torch.no_grad()
def predict(
    model: nn.Module,
    images: ImageList,
    size: int,
    batch: int,
    device: torch.device,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation logits and labels; under DDP each rank scores every world-th image."""
    rank, world = runs_world()
    mine = list(range(rank, len(images), world))
    dataset = ImageDataset(take(images, mine), center_crop_transform(size))
    model.eval()
    chunks = []
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    for x, _, _ in loader:
        chunks.append(model(x.to(device, non_blocking=True)).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.zeros(0, len(images.classes))
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (mine, logits))
        order = [i for idx, _ in parts for i in idx]
        logits = torch.cat([lg for _, lg in parts])[torch.argsort(torch.tensor(order))]
    return logits, torch.tensor(images.labels)


def _state(
    model: FineTuneNet, optimizer: torch.optim.Optimizer, epoch: int, cfg: LowshotConfig
) -> dict[str, Any]:
    """A native-layout checkpoint (trunk under torchvision keys), so load_encoder reads it."""
    return {
        "trunk": model.trunk.state_dict(),
        "classifier": model.fc.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": {**dataclasses.asdict(cfg), "method": "lowshot"},
        "version": CHECKPOINT_VERSION,
    }


def _restore(model: FineTuneNet, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into model and optimizer; the epoch to continue from."""
    model.trunk.load_state_dict(ckpt["trunk"])
    model.fc.load_state_dict(ckpt["classifier"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["epoch"])


def run_settings(given: LowshotConfig, resolved: LowshotConfig) -> dict[str, Any]:
    """config.json: the resolved options, but head_lr and milestones as given (None: derived
    from lr and epochs), so a resume with an allowed new --lr or --epochs derives them afresh."""
    return {
        **dataclasses.asdict(resolved),
        "head_lr": given.head_lr,
        "milestones": given.milestones,
    }


def _optimizer(model: FineTuneNet, cfg: LowshotConfig) -> torch.optim.SGD:
    """SGD with the trunk and the head in their own groups (own base LR, same decay rule)."""
    groups = []
    for part, base in ((model.trunk, cfg.lr), (model.fc, cfg.head_lr)):
        for group in param_groups(part, cfg.weight_decay):
            groups.append({**group, "lr": base, "base_lr": base})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def finetune(cfg: LowshotConfig) -> dict[str, Any]:
    """Fine-tune one encoder on the subset, evaluate on val; rank 0 writes the run folder."""
    rank, world, device = setup_distributed(cfg.device)
    given, cfg = cfg, cfg.resolved()
    per_rank = rank_batch(cfg.batch_size)  # refused before any work if the ranks cannot share it
    train, val, subset = load_data(cfg)
    encoder = load_encoder(cfg.weights, seed=cfg.seed)
    run = RunDir(cfg.out)
    run.start(
        "transfer lowshot",
        run_settings(given, cfg),
        device,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        allow_change=cfg.allow_change,
        logger=cfg.logger,
        record={"encoder": encoder.source, "arch": encoder.arch, "width": encoder.width},
    )
    torch.manual_seed(cfg.seed)
    model = FineTuneNet(encoder.trunk, len(train.classes)).to(device)
    optimizer = _optimizer(model, cfg)
    start = run.restore(lambda ckpt: _restore(model, optimizer, ckpt)) if cfg.resume else 0
    if rank == 0:
        write_subset(run.path("subset.txt"), subset, train)
        log.info(
            "%s: %d training images (%s), %s per class",
            cfg.name,
            len(subset),
            subset.source,
            _count_summary(subset.counts),
        )
    net = wrap_ddp(model, device)
    transform = train_transform(cfg.image_size, cfg.min_crop)
    dataset = ImageDataset(take(train, subset.indices), transform)
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start, cfg.epochs):
        seed_everything(epoch_seed(cfg.seed, epoch, rank))
        loader = epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, cfg.num_workers)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(epoch, cfg.milestones)
        net.train()
        seen, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
        bar = progress(loader, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}")
        for x, y, _ in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            loss = criterion(logits, y)
            run.check_finite(loss.item(), f"epoch {epoch + 1}", device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - t0
        if rank == 0:
            run.save_checkpoint(_state(model, optimizer, epoch + 1, cfg))
            run.append_metrics(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / max(seen, 1),
                    "train_top1": 100 * correct / max(seen, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "head_lr": optimizer.param_groups[-1]["lr"],
                    "images_per_s": seen * world / seconds,
                    "seconds": round(seconds, 2),
                }
            )
    logits, labels = predict(model, val, cfg.image_size, per_rank, device, cfg.num_workers)
    acc = topk_accuracy(logits, labels, (1, 5))
    results = {
        "method": cfg.name,
        "weights": cfg.weights,
        "encoder": encoder.source,
        "percent": cfg.percent,
        "split_file": cfg.split_file,
        "subset": subset.source,
        "train_images": len(subset),
        "val_images": len(val),
        "classes": len(train.classes),
        "per_class": subset.counts,
        "short_classes": subset.short,
        "top1": 100 * acc[1],
        "top5": 100 * acc[5],
        "epochs": cfg.epochs,
    }
    if rank == 0:
        run.write_results(results)
        log.info(
            "%s %g%%: top-1 %.1f, top-5 %.1f",
            cfg.name,
            cfg.percent,
            results["top1"],
            results["top5"],
        )
    return results


def _count_summary(counts: dict[str, int]) -> str:
    values = sorted(set(counts.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
