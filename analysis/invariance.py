"""How invariant is a representation to the jigsaw transform (PIRL paper, Fig. 4), per layer?

For each image I and its jigsaw transform I^t, both representations are unit-normalised and
compared by L2 distance (0 = invariant, sqrt(2) = orthogonal, 2 = opposite); the reference is
the distance of I to the transforms of all other images.

The views are deterministic. I is the whole image resized to `image_size` (224). I^t comes
from the whole image resized to the patch source size (255 at 224): the 3x3 grid of cells, the
patch at the centre of each cell (64 of 85 px), the 9 patches shuffled by a seeded random
permutation per image; no colour augmentation.

Representations compared:
- heads "f-g" (models with PIRL heads): f(v_I) against g(v_I^t), the patches in shuffled order,
  exactly what PIRL's loss sees.
- each trunk stage s (conv1, res2..res5): I's stage map averaged over a 3x3 grid of equal cells,
  against each patch's stage map averaged globally, the 9 patch vectors put back in cell order;
  both are 9 x C vectors, cell-major (cell 0's C channels, then cell 1's, ...). A trunk sees each
  patch alone, so shuffling cannot change a patch's vector: this measures whether a patch seen
  out of context is represented like its region in the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from pirl.data import ImageList, load_image
from pirl.features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, resize_transform
from pirl.jigsaw import JigsawGeometry, cut_patches
from pirl.knn import self_match_rate
from pirl.weights import Encoder

STAGES = ("conv1", "res2", "res3", "res4", "res5")
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


def to_cell_order(slot_feats: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """(n, 9, C) features in shuffled slot order -> (n, 9 * C) in cell order (cell-major)."""
    cells = torch.empty_like(slot_feats)
    cells[torch.arange(len(perms))[:, None], perms] = slot_feats
    return cells.flatten(1)


@dataclass
class Runtime:
    """Where and how features are computed (shared by every model of one analysis)."""

    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True


def _extract(
    encoder: Encoder,
    layer: str,
    grid: int,
    images: ImageList,
    view: object,
    rt: Runtime,
) -> torch.Tensor:
    """Grid-pooled float32 features through the shared extractor and its cache (`view` makes
    the inputs from `images`: a transform, or the patch data set)."""
    ext = FeatureExtractor.for_encoder(encoder, layer, device=rt.device, grid=grid)
    feats = ext.extract(
        images,
        view,
        batch_size=rt.batch_size,
        num_workers=rt.num_workers,
        dtype="float32",
        progress=rt.progress,
    )
    return torch.from_numpy(np.array(feats, dtype=np.float32))


def encoder_invariance(
    encoder: Encoder,
    images: ImageList,
    image_size: int = 224,
    seed: int = 0,
    rt: Runtime | None = None,
) -> list[LayerInvariance]:
    """Distances per trunk stage, then f-g when the encoder has PIRL heads."""
    rt = rt or Runtime()
    geometry = JigsawGeometry.for_image_size(image_size)
    transform = resize_transform(image_size)
    patch_ds = JigsawPatches(images, geometry, seed)
    perms = torch.stack([patch_ds.permutation(i) for i in range(len(images))])
    n, out = len(images), []
    slot_res5 = None
    for stage in STAGES:
        whole = _extract(encoder, stage, 3, images, transform, rt)
        slots = _extract(encoder, stage, 1, images, patch_ds, rt)
        slots = slots.reshape(n, geometry.num_patches, -1)
        out.append(invariance_distances(whole, to_cell_order(slots, perms), stage))
        slot_res5 = slots
    if encoder.heads is not None and slot_res5 is not None:
        pooled = _extract(encoder, "res5", 1, images, transform, rt)
        with torch.no_grad():
            f = encoder.heads.f(pooled)
            g = encoder.heads.g(slot_res5.flatten(0, 1))
        out.append(invariance_distances(f, g, HEADS))
    return out
