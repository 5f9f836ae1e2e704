"""The Jigsaw pretext baseline (Noroozi & Favaro 2016): which permutation shuffled 9 patches?

Each patch goes through the shared trunk on its own (res5, global average pool, d dims); the 9
features are concatenated in the shuffled order (9d) and one Linear layer scores the P
permutations of the set, as VISSL's ResNet-50 Jigsaw (`siamese_concat_view` + `mlp`). The
permutation set is the greedy maximal-Hamming construction of Noroozi & Favaro: start from a
seeded random permutation, then repeatedly add the permutation whose minimum Hamming distance to
those already chosen is largest (the first such in lexicographic order on ties). Noroozi &
Favaro's Algorithm 1 (and the common reimplementations) maximise the summed distance instead;
for 1,000 permutations (seed 0) that gives mean distance 8.01 but pairs only 2 apart, while
max-min gives mean 7.91 with every pair at least 5 apart.

Checkpoint `heads` keys: `permutations` (P, 9) int64, the set in class order (row c is class c);
`classifier.weight` (P, 9d) and `classifier.bias` (P,).
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

from pirl.engine import param_groups
from pirl.jigsaw import JigsawGeometry, PirlTransform, patch_boxes, random_offsets
from pirl.pretext import PretextTrainer
from pirl.trunk import Trunk, build_trunk

NUM_PERMUTATIONS = 1000


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
    """Linear(9d, P) on the patch features concatenated in the shuffled order; keeps the set."""

    def __init__(self, in_dim: int, permutations: torch.Tensor) -> None:
        super().__init__()
        self.num_patches = permutations.shape[1]
        self.register_buffer("permutations", permutations.clone().long())
        self.classifier = nn.Linear(self.num_patches * in_dim, permutations.shape[0])

    def forward(self, patch_feat: torch.Tensor) -> torch.Tensor:
        """patch_feat: (B * 9, d), one image's patches consecutive -> (B, P) logits."""
        return self.classifier(patch_feat.reshape(-1, self.num_patches * patch_feat.shape[1]))


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


class JigsawTransform(PirlTransform):
    """PIRL's patch view with the shuffle drawn from the permutation set.

    Returns (empty image (0,1,1), patches (9,3,P,P), class index) where slot k of the patches
    holds cell permutations[class][k]; the augmentation is PIRL's, per patch.
    """

    def __init__(self, geometry: JigsawGeometry, permutations: torch.Tensor) -> None:
        super().__init__(geometry, with_patches=True)
        self.permutations = permutations

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.geometry
        label = torch.randint(len(self.permutations), ())
        source = self.source_crop(img)
        boxes = patch_boxes(g, random_offsets(g)).tolist()
        cells = [source.crop((x0, y0, x1, y1)) for y0, x0, y1, x1 in boxes]
        patches = torch.stack([self.augment(cells[int(k)]) for k in self.permutations[label]])
        return torch.empty(0, 1, 1), patches, label


class JigsawTrainer(PretextTrainer):
    """The Jigsaw-pretext recipe: workers cut and shuffle the patches by a drawn permutation
    class (with PIRL's per-patch augmentation), the step classifies the class; no memory bank.
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
        optimizer = torch.optim.SGD(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, fused=True
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
