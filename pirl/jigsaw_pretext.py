"""The Jigsaw pretext baseline (Noroozi & Favaro 2016): which permutation shuffled 9 patches?

As Goyal et al. (2019) train it for ResNet-50 and VISSL configures it
(configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml, the source of the paper's Jigsaw rows):
the image's shorter side resized to 256 (at 224), a horizontal flip, a random 255-px crop,
grayscale with probability 0.66, ImageNet normalisation, then the 3x3 cells of 85 px with a 64-px
patch at a random offset (0..20) in each, shuffled by a permutation drawn from a set of 2,000; no
colour jitter and nothing per patch. Each patch goes through the shared trunk on its own (res5,
global average pool, d dims), then Linear(d, 1000), BatchNorm1d and ReLU per patch; the 9 outputs
are concatenated in the shuffled order (9000) and Linear(9000, P) scores the P permutations
(`mlp` with BN, `siamese_concat_view`, `mlp`). SGD with LR 0.1 x batch / 256 warmed up from a
quarter of it over the first 5 of 105 epochs and divided by 10 at epochs 30, 60, 90 and 100,
weight decay 1e-4 on weights and biases, none on BN (pirl/pretrain.py: `--lr-schedule steps`).

The permutation set is the greedy maximal-Hamming construction of Noroozi & Favaro: start from a
seeded random permutation, then repeatedly add the permutation whose minimum Hamming distance to
those already chosen is largest (the first such in lexicographic order on ties). VISSL's set
(`hamming_perms_2000_patches_9_max_avg.npy`) maximises the summed distance instead; for 1,000
permutations (seed 0) that gives mean distance 8.01 but pairs only 2 apart, while max-min gives
mean 7.91 with every pair at least 5 apart.

Checkpoint `heads` keys: `permutations` (P, 9) int64, the set in class order (row c is class c);
`patch.0.*` (Linear), `patch.1.*` (BatchNorm1d) and `classifier.weight` (P, 9 x 1000),
`classifier.bias` (P,).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pirl.engine import param_groups
from pirl.jigsaw import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JigsawGeometry,
    cut_patches,
    random_offsets,
)
from pirl.pretext import PretextTrainer
from pirl.trunk import Trunk, build_trunk

NUM_PERMUTATIONS = 2000  # VISSL's ResNet-50 Jigsaw (perm2000)
HIDDEN = 1000  # the per-patch MLP's width, VISSL's dims [2048, 1000]
SOURCE_GRAYSCALE = 0.66  # VISSL's RandomGrayscale for Jigsaw (PIRL's views use 0.2)


@functools.lru_cache(maxsize=4)
def _all_permutations(num_patches: int) -> np.ndarray:
    """Every permutation of range(num_patches) in lexicographic order, transposed (n, n!)."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(num_patches)))
    total = int(np.prod(np.arange(1, num_patches + 1)))
    perms = np.fromiter(flat, np.uint8, count=total * num_patches).reshape(total, num_patches)
    return np.ascontiguousarray(perms.T)


@functools.lru_cache(maxsize=8)
def _greedy_set(n: int, num_patches: int, seed: int) -> np.ndarray:
    cols = _all_permutations(num_patches)
    total = cols.shape[1]
    if not 1 <= n <= total:
        raise ValueError(f"{n} permutations of {num_patches} patches: choose 1..{total}")
    chosen = [int(np.random.default_rng(seed).integers(total))]
    min_dist = np.full(total, num_patches + 1, dtype=np.uint8)
    dist = np.empty(total, dtype=np.uint8)
    for _ in range(n - 1):
        j = chosen[-1]
        dist[:] = 0
        for r in range(num_patches):
            dist += cols[r] != cols[r, j]
        np.minimum(min_dist, dist, out=min_dist)
        chosen.append(int(min_dist.argmax()))
    return cols[:, chosen].T.astype(np.int64)


def hamming_permutations(
    n: int = NUM_PERMUTATIONS, num_patches: int = 9, seed: int = 0
) -> torch.Tensor:
    """(n, num_patches) permutations far apart in Hamming distance, so classes are separable."""
    return torch.from_numpy(_greedy_set(n, num_patches, seed).copy())


def min_hamming_distance(perms: torch.Tensor) -> int:
    """Smallest number of positions in which two permutations of the set differ."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d.fill_diagonal_(perms.shape[1] + 1)
    return int(d.min())


class JigsawHead(nn.Module):
    """Per patch Linear(d, 1000), BatchNorm1d, ReLU; the 9 outputs concatenated in the shuffled
    order; Linear(9 x 1000, P) scores the permutations. Keeps the permutation set."""

    def __init__(self, in_dim: int, permutations: torch.Tensor, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.num_patches = permutations.shape[1]
        self.register_buffer("permutations", permutations.clone().long())
        self.patch = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Linear(self.num_patches * hidden, permutations.shape[0])

    def forward(self, patch_feat: torch.Tensor) -> torch.Tensor:
        """patch_feat: (B * 9, d), one image's patches consecutive -> (B, P) logits."""
        hidden = self.patch(patch_feat)
        return self.classifier(hidden.reshape(-1, self.num_patches * hidden.shape[1]))


class JigsawModel(nn.Module):
    """Shared trunk on each patch + JigsawHead."""

    def __init__(self, trunk: Trunk, heads: JigsawHead) -> None:
        super().__init__()
        self.trunk, self.heads = trunk, heads

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, 9, 3, P, P) shuffled patches -> permutation logits (B, P)."""
        return self.heads(self.trunk.pooled(patches.flatten(0, 1)))


class JigsawLoss(nn.Module):
    """Cross-entropy over the permutation classes."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class JigsawTransform:
    """The Jigsaw view of VISSL's ResNet Jigsaw config, at any image size (pirl/jigsaw.py's
    geometry): shorter side to 256/224 of the view size, flip, a random square crop of the patch
    source's size, grayscale (p 0.66), ImageNet normalisation; one patch per cell at a random
    offset, shuffled by a permutation drawn from the set.

    Returns (empty image (0,1,1), patches (9,3,P,P), class index) where slot k of the patches
    holds cell permutations[class][k].
    """

    def __init__(self, geometry: JigsawGeometry, permutations: torch.Tensor) -> None:
        self.geometry, self.permutations = geometry, permutations
        resize = max(round(geometry.image_size * 256 / 224), geometry.source_size)
        self.source = T.Compose(
            [
                T.Resize(resize),
                T.RandomHorizontalFlip(),
                T.RandomCrop(geometry.source_size),
                T.RandomGrayscale(SOURCE_GRAYSCALE),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.geometry
        label = torch.randint(len(self.permutations), ())
        patches = cut_patches(self.source(img), g, random_offsets(g), self.permutations[label])
        return torch.empty(0, 1, 1), patches, label


class JigsawTrainer(PretextTrainer):
    """The Jigsaw-pretext recipe: workers cut and shuffle the patches by a drawn permutation
    class (VISSL's Jigsaw augmentation), the step classifies the class; no memory bank.
    Trained by pirl/pretrain.py's loop with `--method jigsaw`."""

    @classmethod
    def build(cls, cfg: Any, device: torch.device) -> JigsawTrainer:
        """Model, loss and SGD (weight decay on weights only) from the resolved config."""
        torch.manual_seed(cfg.seed)
        trunk = build_trunk(cfg.arch, cfg.width)
        head = JigsawHead(trunk.out_dim, hamming_permutations(cfg.num_permutations))
        model = JigsawModel(trunk, head).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(  # VISSL's Jigsaw decays biases (regularize_bias), not BN
            param_groups(model, cfg.weight_decay, decay_bias=True),
            lr=cfg.lr,
            momentum=cfg.momentum,
            fused=True,
        )
        return cls(cfg, model, JigsawLoss(), optimizer)

    def transform(self) -> JigsawTransform:
        """What the loader's workers make of each image."""
        geometry = JigsawGeometry.for_image_size(self.cfg.image_size)
        return JigsawTransform(geometry, hamming_permutations(self.cfg.num_permutations))

    def chance_loss(self, data_size: int) -> float:
        """log(classes): the loss of a classifier that cannot tell the permutations apart."""
        return math.log(self.cfg.num_permutations)

    def loss(
        self,
        model: nn.Module,
        views: tuple[torch.Tensor, ...],
        idx: torch.Tensor,
        neg_gen: torch.Generator,
        aug_gen: torch.Generator,
        amp: bool,
    ) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        """Cross-entropy of the permutation logits against the class the worker drew (one term:
        no per-term split)."""
        device = idx.device
        patches, perm = views[1].to(device, non_blocking=True), views[2].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(patches)
        return self.criterion(logits.float(), perm), None, {}
