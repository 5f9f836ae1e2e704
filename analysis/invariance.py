"""How invariant is a representation to the jigsaw transform (PIRL paper, Fig. 4), per layer?

For each image I and its jigsaw transform I^t, both representations are unit-normalised and
compared by L2 distance (0 = invariant, sqrt(2) = orthogonal, 2 = opposite); the reference is
the distance of I to the transforms of all other images.

The views are deterministic. I is the whole image resized to `image_size` (224). I^t comes
from the whole image resized to the patch source size (255 at 224): the 3x3 grid of cells, the
patch at the centre of each cell (64 of 85 px), the 9 patches shuffled by a seeded random
permutation per image; no colour augmentation. Each view goes through the trunk with BN
statistics estimated on that view over the analysed images: training normalises the patches and
the image each by its own batch, and eval mode's one set of running statistics fits neither at
small scale (docs/reference.md).

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

from dataclasses import dataclass

import numpy as np
import torch

from pirl.data import ImageList
from pirl.features import FeatureExtractor
from pirl.invariance import (
    JigsawViews,
    LayerInvariance,
    heads_invariance,
    invariance_distances,
    per_view,
)
from pirl.trunk import Trunk
from pirl.weights import Encoder

STAGES = ("conv1", "res2", "res3", "res4", "res5")


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
    trunk: Trunk,
    identity: str,
    layer: str,
    grid: int,
    images: ImageList,
    view: object,
    rt: Runtime,
) -> torch.Tensor:
    """Grid-pooled float32 features of one view through the trunk with that view's BN
    statistics, via the shared extractor and its cache (`view` makes the inputs from `images`: a
    transform, or the patch data set)."""
    ext = FeatureExtractor(trunk, layer, rt.device, grid=grid, identity=per_view(identity))
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
    """Distances per trunk stage, then f-g when the encoder has PIRL heads; each view goes
    through the trunk with its own BN statistics (pirl/invariance.py: view_statistics)."""
    rt = rt or Runtime()
    views = JigsawViews.build(
        encoder.trunk, images, image_size, seed, rt.device, rt.batch_size, rt.num_workers
    )
    perms = torch.stack([views.patches.permutation(i) for i in range(len(images))])
    n, out = len(images), []
    for stage in STAGES:
        whole = _extract(
            views.image_trunk, encoder.fingerprint, stage, 3, images, views.image.transform, rt
        )
        slots = _extract(
            views.patch_trunk, encoder.fingerprint, stage, 1, images, views.patches, rt
        )
        slots = slots.reshape(n, views.patches.geometry.num_patches, -1)
        out.append(invariance_distances(whole, to_cell_order(slots, perms), stage))
    if encoder.heads is not None:  # res5's features come from the cache just written
        out.append(
            heads_invariance(
                views,
                encoder.heads,
                rt.device,
                rt.batch_size,
                rt.num_workers,
                identity=encoder.fingerprint,
                progress=rt.progress,
            )
        )
    return out
