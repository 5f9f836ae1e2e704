"""How invariant are PIRL's heads to the jigsaw transform: what the pretraining monitor reports
each time it scores a run, and what `analyze invariance` (analysis/invariance.py) reports per layer.

The jigsaw view here is deterministic: the whole image resized to the patch source size (255 at
224), the 3x3 grid of cells, the patch at the centre of each cell (64 of 85 px), the 9 patches
shuffled by a seeded random permutation per image; no colour augmentation. Both representations
are unit-normalised and compared by L2 distance (0 = invariant, sqrt(2) = orthogonal,
2 = opposite) against the distance to the transforms of all other images, and by retrieval: how
often the transform's nearest original is its own image. Each view goes through a copy of the
trunk whose BN statistics are that view's, estimated on the analysed images (view_statistics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from pirl.data import ImageDataset, ImageList, load_image
from pirl.engine import resolve_device
from pirl.features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, resize_transform
from pirl.jigsaw import JigsawGeometry, cut_patches
from pirl.knn import self_match_rate
from pirl.trunk import Trunk

HEADS = "f-g"
BINS = np.linspace(0.0, 2.0, 41)  # unit vectors: every distance lies in [0, 2]


@dataclass
class LayerInvariance:
    """Distances of one layer: own-transform per image, all other pairs as histogram and mean."""

    layer: str
    dim: int
    own: np.ndarray
    mean_other: float
    hist_other: np.ndarray
    self_match: float
    hist_own: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.hist_own = np.histogram(self.own, BINS)[0]

    @property
    def mean_own(self) -> float:
        return float(self.own.mean())

    @property
    def ratio(self) -> float:
        """Mean distance to the own transform over mean distance to others (< 1: invariant)."""
        return self.mean_own / self.mean_other


def invariance_distances(
    originals: np.ndarray | torch.Tensor,
    transformed: np.ndarray | torch.Tensor,
    layer: str = "",
    chunk: int = 1024,
) -> LayerInvariance:
    """own_i = |a_i - b_i|, others = |a_i - b_j| for all j != i, a and b unit-normalised rows.

    The n x n distances are computed in row chunks, so memory stays O(chunk * n) for any n.
    """
    a = F.normalize(torch.as_tensor(np.asarray(originals), dtype=torch.float64), dim=1)
    b = F.normalize(torch.as_tensor(np.asarray(transformed), dtype=torch.float64), dim=1)
    n = len(a)
    if n < 2:
        raise ValueError("need at least two images to compare against other images")
    own = (a - b).norm(dim=1).numpy()
    total, hist = 0.0, np.zeros(len(BINS) - 1, dtype=np.int64)
    for start in range(0, n, chunk):
        d = torch.cdist(a[start : start + chunk], b)
        rows = torch.arange(len(d))
        off = torch.ones_like(d, dtype=torch.bool)
        off[rows, rows + start] = False
        others = d[off].numpy()
        total += float(others.sum())
        hist += np.histogram(np.clip(others, 0, 2), BINS)[0]
    return LayerInvariance(
        layer, a.shape[1], own, total / (n * (n - 1)), hist, self_match_rate(a.numpy(), b.numpy())
    )


class JigsawPatches(torch.utils.data.Dataset):
    """Every image's 9 centre patches in shuffled order, one item each: item 9i + k is slot k of
    image i, holding the patch of cell permutation(i)[k]. Yields (patch, label, item)."""

    def __init__(self, images: ImageList, geometry: JigsawGeometry, seed: int = 0) -> None:
        self.images, self.geometry, self.seed = images, geometry, seed
        g = geometry
        self.offsets = torch.full((g.num_patches, 2), (g.cell - g.patch_size) // 2)
        self.to_source = T.Compose(
            [
                T.Resize((g.source_size, g.source_size)),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self._last: tuple[int, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"JigsawPatches({self.geometry}, centre offsets, seed={self.seed})"

    def __len__(self) -> int:
        return len(self.images) * self.geometry.num_patches

    def permutation(self, i: int) -> torch.Tensor:
        """The seeded shuffle of image i: slot k holds cell permutation(i)[k]."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randperm(self.geometry.num_patches, generator=gen)

    def patches(self, i: int) -> torch.Tensor:
        """(9, 3, P, P) shuffled patches of image i; the last is kept, as items come in order."""
        if self._last is None or self._last[0] != i:
            source = self.to_source(load_image(self.images.paths[i]))
            self._last = (i, cut_patches(source, self.geometry, self.offsets, self.permutation(i)))
        return self._last[1]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        i, k = divmod(item, self.geometry.num_patches)
        return self.patches(i)[k], self.images.labels[i], item


def view_statistics(
    trunk: Trunk,
    view: torch.utils.data.Dataset,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
) -> Trunk:
    """A copy of the trunk whose BatchNorm statistics are those of one view (a cumulative
    average over its batches, as Precise BN estimates them). In PIRL's training every view is
    normalised by its own batch's statistics (the 9 x B patches, then the B images), but eval
    mode has one set of running statistics for both, which at small scale fits neither: so each
    view is analysed as training computes it."""
    device = resolve_device(device) if isinstance(device, str) else device
    copy_ = copy.deepcopy(trunk).to(device)
    for m in copy_.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    copy_.train()
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=num_workers)
    with torch.no_grad():
        for batch in loader:
            copy_(batch[0].to(device), ("res5",))
    return copy_.eval()


@dataclass
class JigsawViews:
    """The two views the analysis compares, each with the trunk that has its BN statistics:
    the whole image (resize_transform) and its deterministic jigsaw view (JigsawPatches)."""

    image: ImageDataset
    patches: JigsawPatches
    image_trunk: Trunk
    patch_trunk: Trunk

    @classmethod
    def build(
        cls,
        trunk: Trunk,
        images: ImageList,
        image_size: int = 224,
        seed: int = 0,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> JigsawViews:
        """Both views of `images` and a copy of the trunk per view (view_statistics)."""
        image = ImageDataset(images, resize_transform(image_size))
        patches = JigsawPatches(images, JigsawGeometry.for_image_size(image_size), seed)
        patch_batch = batch_size * patches.geometry.num_patches  # as training batches them
        return cls(
            image,
            patches,
            view_statistics(trunk, image, device, batch_size, num_workers),
            view_statistics(trunk, patches, device, patch_batch, num_workers),
        )


def heads_invariance(
    views: JigsawViews,
    heads: nn.Module,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    identity: str | None = None,
    alone: bool = False,
    progress: bool = False,
) -> LayerInvariance:
    """f(v_I) against g(v_I^t), the patches in shuffled order, exactly what PIRL's patch term
    compares: its own/other distance ratio and how often g retrieves its own image's f.
    `identity` (an `Encoder.fingerprint`) shares the features through the extractor's cache;
    None (a trunk still training: pass a copy) computes them afresh."""
    images = views.image.images
    feats = []
    for trunk, view in (
        (views.image_trunk, views.image.transform),
        (views.patch_trunk, views.patches),
    ):
        ext = FeatureExtractor(
            trunk, "res5", device, grid=1, identity=per_view(identity), alone=alone
        )
        out = ext.extract(images, view, batch_size, num_workers, "float32", progress)
        feats.append(torch.from_numpy(np.array(out, dtype=np.float32)))
    at = next(heads.parameters()).device
    with torch.no_grad():
        f, g = heads.f(feats[0].to(at)), heads.g(feats[1].to(at))
    return invariance_distances(f.cpu(), g.cpu(), HEADS)


def per_view(identity: str | None) -> str | None:
    """The cache identity of features computed with per-view BN statistics (not the stored)."""
    return None if identity is None else f"{identity}|bn-per-view"
