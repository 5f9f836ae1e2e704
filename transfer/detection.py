"""Table 1: Faster R-CNN R50-C4 fine-tuned from an encoder on VOC07+12, AP/AP50/AP75 on VOC07 test.

The detector is torchvision's FasterRCNN assembled into detectron2's C4 layout: the trunk
up to res4 (stride 16) is the backbone, the RPN runs on res4 (anchors 32..512, ratios
0.5/1/2), RoIAlign 14x14 (sampling ratio 0, aligned=True like detectron2's ROIAlignV2)
feeds res5 as the box head, global average pooling, then class and box predictors. Every
BatchNorm is frozen with the encoder's statistics and the stem and res2 are frozen
(detectron2 FREEZE_AT=2). Anchors are detectron2's cell anchors (not rounded to whole pixels
as torchvision's are), so with weights converted by `transfer.detectron2_backend` both
detectors give the same proposals and detections. Known differences from detectron2 in
training: torchvision's smooth-L1 box losses (beta 1/9) instead of L1, and no aspect-ratio
grouping of batches. The detectron2 backend itself is `transfer/detectron2_backend.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align

from pirl.engine import (
    RunDir,
    progress,
    rank_batch,
    require_at_least,
    resolve_device,
    seed_everything,
    setup_distributed,
    wrap_ddp,
)
from pirl.errors import UserError
from pirl.tables import markdown_table
from pirl.trunk import Trunk
from transfer.voc_ap import Detections, write_devkit_detections
from transfer.voc_detection import (
    VocDetectionDataset,
    VocImage,
    build_embedded_voc,
    collate,
    parse_set_name,
    read_voc_set,
    score_devkit_detections,
    voc_classes,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VISSL's PIRL/NPID VOC07+12 schedule (benchmark/object_detection/voc0712/pirl_npid): its
# iccv19 base (25k iterations, 16 images, step at 17k) with BASE_LR 0.002 and 1,000 warmup
# iterations; detectron2's defaults elsewhere (warmup factor 1/1000, momentum 0.9, wd 1e-4).
PAPER_ITERS, PAPER_BATCH, PAPER_LR, PAPER_STEP, PAPER_WARMUP = 25_000, 16, 0.002, 17_000, 1_000
PAPER_TRAIN_SIZES = tuple(range(480, 801, 32))
PAPER_TEST_SIZE, PAPER_MAX_SIZE = 800, 1333
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


# --------------------------------------------------------------------------- model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by FrozenBatchNorm2d holding the same statistics and affine."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


class C4Backbone(nn.Module):
    """Stem, res2, res3, res4 of the trunk: one stride-16 feature map named res4."""

    def __init__(self, trunk: Trunk) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            trunk.conv1,
            trunk.bn1,
            trunk.relu,
            trunk.maxpool,
        )
        self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
        self.out_channels = trunk.channels["res4"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict(res4=self.layer3(self.layer2(self.layer1(x))))


class C4RoIAlign(MultiScaleRoIAlign):
    """RoIAlign of res4 to 14x14 with half-pixel alignment (detectron2's ROIAlignV2).

    Subclasses MultiScaleRoIAlign only because FasterRCNN checks that type; torchvision's
    version uses aligned=False.
    """

    def __init__(self, resolution: int = 14, stride: int = 16) -> None:
        super().__init__(["res4"], resolution, 0)
        self.resolution, self.scale = resolution, 1.0 / stride

    def forward(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: Any
    ) -> torch.Tensor:
        return roi_align(
            features["res4"], proposals, (self.resolution, self.resolution),
            spatial_scale=self.scale, sampling_ratio=0, aligned=True,
        )  # fmt: skip


class Res5Head(nn.Module):
    """res5 (stride 2: 14x14 -> 7x7) on each RoI, then global average pooling."""

    def __init__(self, trunk: Trunk) -> None:
        super().__init__()
        self.layer4 = trunk.layer4
        self.out_channels = trunk.channels["res5"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean(dim=(2, 3))


class C4AnchorGenerator(AnchorGenerator):
    """torchvision's anchor order (ratio-major) with detectron2's cell anchors: width
    sqrt(size^2 / ratio), height ratio * width, centred on 0 and not rounded to whole pixels."""

    def generate_anchors(
        self,
        scales: Sequence[int],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        sizes = torch.as_tensor(scales, dtype=torch.float64)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        w = torch.sqrt(sizes[None, :] ** 2 / ratios[:, None])
        h = ratios[:, None] * w
        anchors = torch.stack([-w / 2, -h / 2, w / 2, h / 2], dim=-1).reshape(-1, 4)
        return anchors.to(dtype=dtype, device=device)


class SizeByMode(GeneralizedRCNNTransform):
    """Shorter side: a random train size when training, the test size otherwise."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int) -> None:
        super().__init__(tuple(train_sizes), max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.train_sizes, self.test_size = tuple(train_sizes), test_size

    def resize(self, image: torch.Tensor, target: Any = None) -> Any:
        self.min_size = self.train_sizes if self.training else (self.test_size,)
        return super().resize(image, target)


def build_c4_detector(
    trunk: Trunk,
    num_classes: int,
    train_sizes: Sequence[int] = PAPER_TRAIN_SIZES,
    test_size: int = PAPER_TEST_SIZE,
    max_size: int = PAPER_MAX_SIZE,
    freeze_at: int = 2,
    roi_batch_size: int = 512,
    proposals: tuple[int, int] = (2000, 1000),
) -> FasterRCNN:
    """Faster R-CNN C4 on a copy of the trunk: BN, stem and res2 frozen; detectron2's values."""
    trunk = freeze_batchnorm(copy.deepcopy(trunk))
    frozen = [trunk.conv1, trunk.bn1, trunk.layer1][: {0: 0, 1: 2, 2: 3}[freeze_at]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    head = Res5Head(trunk)
    predictor = FastRCNNPredictor(head.out_channels, num_classes + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for b in (predictor.cls_score.bias, predictor.bbox_pred.bias):
        nn.init.zeros_(b)
    model = FasterRCNN(
        C4Backbone(trunk),
        rpn_anchor_generator=C4AnchorGenerator((ANCHOR_SIZES,), (ANCHOR_RATIOS,)),
        rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=proposals[0],
        rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=proposals[1],
        box_roi_pool=C4RoIAlign(), box_head=head, box_predictor=predictor,
        box_batch_size_per_image=roi_batch_size, box_score_thresh=0.05, box_nms_thresh=0.5,
        box_detections_per_img=100,
    )  # fmt: skip
    model.transform = SizeByMode(train_sizes, test_size, max_size)
    return model


# --------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    """The paper's schedule scaled to `iters` and `batch_size` (LR linear in the batch)."""

    iters: int = PAPER_ITERS
    batch_size: int = PAPER_BATCH
    base_lr: float = PAPER_LR
    steps: tuple[int, ...] = (PAPER_STEP,)
    warmup: int = PAPER_WARMUP
    warmup_factor: float = 0.001
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4

    @classmethod
    def scaled(
        cls, iters: int = PAPER_ITERS, batch_size: int = PAPER_BATCH, lr16: float = PAPER_LR
    ) -> Schedule:
        """Milestone and warmup keep their fraction of the run; LR = lr16 * batch / 16."""
        require_at_least(1, iters=iters, batch_size=batch_size)
        frac = iters / PAPER_ITERS
        return cls(
            iters=iters, batch_size=batch_size, base_lr=lr16 * batch_size / PAPER_BATCH,
            steps=(round(PAPER_STEP * frac),), warmup=round(PAPER_WARMUP * frac),
        )  # fmt: skip

    def lr(self, it: int) -> float:
        """detectron2's WarmupMultiStepLR: linear warmup from warmup_factor, x gamma per step."""
        lr = self.base_lr * self.gamma ** sum(it >= s for s in self.steps)
        if it < self.warmup:
            alpha = it / self.warmup
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr


# --------------------------------------------------------------------------- run


def uses_07_metric(metric: str, test_set: str) -> bool:
    """11-point AP for VOC2007 as detectron2 does, the area metric for later years ('auto')."""
    if metric == "auto":
        return test_set.split("/")[0] == "2007"
    return metric == "11point"


@dataclass
class DetectionConfig:
    """Everything a detection run depends on, one field per command option (config.json reads
    back as a --config file); data None is the embedded VOC set."""

    out: str = "runs/detection"
    data: str | None = None
    weights: str | None = None
    name: str | None = None
    arch: str | None = None
    train_sets: tuple[str, ...] = ("2007/trainval", "2012/trainval")
    test_set: str = "2007/test"
    iters: int = PAPER_ITERS
    batch_size: int = PAPER_BATCH
    lr: float = PAPER_LR  # for 16 images, scaled linearly with batch_size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    train_sizes: tuple[int, ...] = PAPER_TRAIN_SIZES
    test_size: int = PAPER_TEST_SIZE
    max_size: int = PAPER_MAX_SIZE
    roi_batch_size: int = 512
    proposals: tuple[int, int] = (2000, 1000)
    metric: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 4
    checkpoint_every: int = 2500
    resume: bool = False
    overwrite: bool = False
    allow_change: tuple[str, ...] = ()
    logger: str = "none"  # metrics also to tensorboard or wandb (pirl/loggers.py)
    backend: str = "torchvision"

    def schedule(self) -> Schedule:
        """The paper's schedule scaled to these iters, batch size and LR."""
        require_at_least(
            1,
            checkpoint_every=self.checkpoint_every,
            test_size=self.test_size,
            max_size=self.max_size,
            roi_batch_size=self.roi_batch_size,
        )
        require_at_least(0, num_workers=self.num_workers)
        scaled = Schedule.scaled(self.iters, self.batch_size, self.lr)
        return dataclasses.replace(scaled, momentum=self.momentum, weight_decay=self.weight_decay)


def _endless_batches(
    dataset: VocDetectionDataset, per_rank: int, seed: int, start: int, rank: int, world: int,
    num_workers: int,
) -> Iterator[Any]:  # fmt: skip
    """Batches forever, reshuffled each pass with a seed fixed by (seed, pass); a resume starts
    the interrupted pass afresh (the order repeats, the position in it does not)."""
    epoch = start * per_rank * world // max(len(dataset), 1)
    while True:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
            collate_fn=collate, drop_last=True,
        )  # fmt: skip
        yield from loader
        epoch += 1


@torch.no_grad()
def detect(
    model: nn.Module, images: Sequence[VocImage], classes: Sequence[str], device: torch.device,
    batch_size: int, num_workers: int, rank: int = 0, world: int = 1,
) -> dict[str, Detections]:  # fmt: skip
    """Run the detector on a split; boxes come back in the devkit's 1-based pixel convention."""
    model.eval()
    shard = list(range(rank, len(images), world))
    data = torch.utils.data.Subset(VocDetectionDataset(images, classes, train=False), shard)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
    )
    rows: list[tuple[str, int, float, list[float]]] = []
    for imgs, _, idx in progress(loader, desc="detect"):
        outputs = model([im.to(device) for im in imgs])
        for i, out in zip(idx, outputs, strict=True):
            boxes = out["boxes"].cpu().double()
            boxes[:, :2] += 1.0
            for b, s, lab in zip(
                boxes.tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
            ):
                rows.append((images[i].image_id, lab, s, b))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    by_label: dict[int, list[tuple[str, int, float, list[float]]]] = {}
    for r in rows:
        by_label.setdefault(r[1], []).append(r)
    out: dict[str, Detections] = {}
    for k, cls in enumerate(classes, start=1):
        mine = by_label.get(k, [])
        out[cls] = Detections(
            [r[0] for r in mine],
            np.array([r[2] for r in mine], dtype=np.float64),
            np.array([r[3] for r in mine], dtype=np.float64).reshape(-1, 4),
        )
    return out


def _load_trunk(cfg: DetectionConfig) -> tuple[Trunk, str]:
    from pirl.weights import load_encoder

    # No weights: the random floor row; on the embedded set, a trunk small enough for a CPU.
    spec = cfg.weights or ("random:resnet50" if cfg.data else "random:resnet18@0.25")
    enc = load_encoder(spec, arch=cfg.arch, seed=cfg.seed)
    return enc.trunk, enc.source


def _splits(cfg: DetectionConfig) -> tuple[Path, list[VocImage], list[VocImage], str, str]:
    devkit = Path(cfg.data) if cfg.data else build_embedded_voc()
    train = [im for s in cfg.train_sets for im in read_voc_set(devkit, *parse_set_name(s))]
    year, split = parse_set_name(cfg.test_set)
    return devkit, train, read_voc_set(devkit, year, split), year, split


def markdown_row(name: str, results: dict[str, Any]) -> str:
    """One row of the paper's Table 1 (Method | AP | AP50 | AP75)."""
    return f"| {name} | {results['AP']:.1f} | {results['AP50']:.1f} | {results['AP75']:.1f} |"


def _claim(
    cfg: DetectionConfig, device: torch.device, devkit: Path, source: str, classes: list[str],
    checkpoint: str = "checkpoint.pth",
) -> tuple[str, RunDir]:  # fmt: skip
    """Claim cfg.out as a `transfer detection` run (the guard, the resume check, the logger);
    the method's name and the run folder."""
    name = cfg.name or (Path(cfg.weights).stem if cfg.weights else "random")
    run = RunDir(cfg.out)
    run.start(
        "transfer detection", {**asdict(cfg), "data": str(devkit), "name": name}, device,
        resume=cfg.resume, overwrite=cfg.overwrite, allow_change=cfg.allow_change,
        record={"weights_source": source, "classes": classes}, checkpoint=checkpoint,
        logger=cfg.logger,
    )  # fmt: skip
    return name, run


def _restore(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> int:
    """Load a checkpoint into model and optimizer; the iteration to continue from."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["iteration"])


def run_detection(cfg: DetectionConfig) -> dict[str, Any]:
    """Fine-tune the C4 detector from the encoder, test it, write the run folder."""
    if cfg.backend == "detectron2":
        from transfer.detectron2_backend import run_detectron2

        return run_detectron2(cfg)
    rank, world, device = setup_distributed(cfg.device)
    sched = cfg.schedule()
    per_rank = rank_batch(sched.batch_size)
    seed_everything(cfg.seed + rank)
    devkit, train, test, year, split = _splits(cfg)
    classes = voc_classes(train + test)
    trunk, source = _load_trunk(cfg)
    name, run = _claim(cfg, device, devkit, source, classes)
    main = rank == 0
    model = build_c4_detector(
        trunk, len(classes), cfg.train_sizes, cfg.test_size, cfg.max_size, 2,
        cfg.roi_batch_size, cfg.proposals,
    )  # fmt: skip
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=sched.lr(0), momentum=sched.momentum, weight_decay=sched.weight_decay
    )
    start = run.restore(lambda state: _restore(model, opt, state)) if cfg.resume else 0
    net = wrap_ddp(model, device)
    dataset = VocDetectionDataset(train, classes, train=True)
    if len(dataset) < sched.batch_size:
        raise UserError(
            f"{devkit}: {len(dataset)} training images, fewer than --batch-size {sched.batch_size}"
        )
    batches = _endless_batches(dataset, per_rank, cfg.seed, start, rank, world, cfg.num_workers)
    bar = progress(total=sched.iters, initial=start, desc="detection")
    net.train()
    t0 = time.time()
    for it in range(start, sched.iters):
        imgs, targets, _ = next(batches)
        imgs = [im.to(device, non_blocking=True) for im in imgs]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        for g in opt.param_groups:
            g["lr"] = sched.lr(it)
        losses = net(imgs, targets)
        loss = sum(losses.values())
        run.check_finite(loss.item(), f"iteration {it}", device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.lr(it):.2g}")
        done = it + 1
        if main and (done % 20 == 0 or done == sched.iters):
            run.append_metrics({"iteration": done, "loss": loss.item(), "lr": sched.lr(it),
                                **{k: v.item() for k, v in losses.items()},
                                "seconds": round(time.time() - t0, 1)})  # fmt: skip
        if main and (done % cfg.checkpoint_every == 0 or done == sched.iters):
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "iteration": done, "config": asdict(cfg), "version": 1}  # fmt: skip
            run.save_checkpoint(state)
    bar.close()
    dets = detect(model, test, classes, device, per_rank, cfg.num_workers, rank, world)
    if not main:
        return {}
    det_dir = run.path("detections")
    write_devkit_detections(det_dir, dets, split)
    results = score_devkit_detections(
        devkit, det_dir, year, split, uses_07_metric(cfg.metric, cfg.test_set)
    )
    results.update({"method": name, "weights": source, "iterations": sched.iters,
                    "test_set": cfg.test_set, "train_sets": list(cfg.train_sets)})  # fmt: skip
    run.write_results(results)
    (run.path("table1_row.md")).write_text(markdown_row(name, results) + "\n")
    return results


def assemble_table1(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Collect detection run folders into the paper's Table 1 (Method, AP, AP50, AP75)."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise UserError(f"{path}: not a finished detection run (no results.json)")
        try:
            res = json.loads(path.read_text())
            rows.append(
                {"Method": res["method"], "AP": res["AP"], "AP50": res["AP50"], "AP75": res["AP75"]}
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a detection results file ({exc})") from None
    return pd.DataFrame(rows, columns=["Method", "AP", "AP50", "AP75"])


# --------------------------------------------------------------------------- detectron2


def _d2_dataset_name(spec: str) -> str:
    year, split = parse_set_name(spec)
    return f"pirl_voc_{year}_{split}"


def detectron2_config(
    cfg: DetectionConfig, weights_pkl: str | Path, arch: str, num_classes: int
) -> dict[str, Any]:
    """detectron2's PascalVOC R50-C4 config values for this run (torchvision-style RGB weights)."""
    depths = {"resnet50": 50, "resnet101": 101}
    if arch not in depths:
        raise UserError(
            f"--backend detectron2 builds C4 heads from bottleneck ResNets only, not {arch}"
        )
    s = cfg.schedule()
    return {
        "VERSION": 2,
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "WEIGHTS": str(weights_pkl),
            "MASK_ON": False,
            "DEVICE": str(resolve_device(cfg.device)),
            "PIXEL_MEAN": [255 * m for m in IMAGENET_MEAN],
            "PIXEL_STD": [255 * v for v in IMAGENET_STD],
            "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
            "RESNETS": {"DEPTH": depths[arch], "OUT_FEATURES": ["res4"], "NORM": "FrozenBN",
                        "STRIDE_IN_1X1": False},
            "ANCHOR_GENERATOR": {"SIZES": [list(ANCHOR_SIZES)],
                                 "ASPECT_RATIOS": [list(ANCHOR_RATIOS)]},
            "RPN": {"IN_FEATURES": ["res4"], "PRE_NMS_TOPK_TRAIN": 12000,
                    "POST_NMS_TOPK_TRAIN": cfg.proposals[0], "PRE_NMS_TOPK_TEST": 6000,
                    "POST_NMS_TOPK_TEST": cfg.proposals[1]},
            "ROI_HEADS": {"NAME": "Res5ROIHeads", "IN_FEATURES": ["res4"],
                          "NUM_CLASSES": num_classes,
                          "BATCH_SIZE_PER_IMAGE": cfg.roi_batch_size,
                          "SCORE_THRESH_TEST": 0.05, "NMS_THRESH_TEST": 0.5},
            "ROI_BOX_HEAD": {"POOLER_RESOLUTION": 14, "POOLER_SAMPLING_RATIO": 0,
                             "POOLER_TYPE": "ROIAlignV2"},
        },
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TRAIN": list(cfg.train_sizes),
                  "MIN_SIZE_TRAIN_SAMPLING": "choice", "MIN_SIZE_TEST": cfg.test_size,
                  "MAX_SIZE_TRAIN": cfg.max_size, "MAX_SIZE_TEST": cfg.max_size},
        "DATASETS": {"TRAIN": [_d2_dataset_name(t) for t in cfg.train_sets],
                     "TEST": [_d2_dataset_name(cfg.test_set)]},
        "SOLVER": {"IMS_PER_BATCH": s.batch_size, "BASE_LR": s.base_lr, "STEPS": list(s.steps),
                   "MAX_ITER": s.iters, "WARMUP_ITERS": s.warmup, "WARMUP_FACTOR": s.warmup_factor,
                   "GAMMA": s.gamma, "MOMENTUM": s.momentum, "WEIGHT_DECAY": s.weight_decay,
                   "CHECKPOINT_PERIOD": cfg.checkpoint_every},
        "TEST": {"DETECTIONS_PER_IMAGE": 100},
        "DATALOADER": {"NUM_WORKERS": cfg.num_workers},
        "OUTPUT_DIR": str(Path(cfg.out) / "detectron2"),
        "SEED": cfg.seed,
    }  # fmt: skip


def write_detectron2_handover(
    cfg: DetectionConfig, trunk: Trunk, num_classes: int
) -> tuple[Path, Path]:
    """Write the weights (.pkl) and config (.yaml) detectron2 takes, into the run folder."""
    from pirl.weights import save_detectron2

    out = Path(cfg.out)
    if trunk.width != 1:
        raise UserError(f"--backend detectron2 needs a full-width trunk, not width {trunk.width:g}")
    pkl = out / "detectron2_weights.pkl"
    config = detectron2_config(cfg, pkl.resolve(), trunk.arch, num_classes)
    state = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_detectron2(state, pkl)
    yaml_path = out / "detectron2_config.yaml"
    yaml_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
    return yaml_path, pkl


def table1_markdown(table: pd.DataFrame) -> str:
    """The paper's Table 1 layout in Markdown (one decimal, as published)."""
    return markdown_table(table[["Method", "AP", "AP50", "AP75"]])
