"""Jigsaw geometry: published sizes, patches inside their cells, recorded invertible shuffle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pirl.augment import jigsaw_draw
from pirl.jigsaw import (
    JigsawGeometry,
    PirlTransform,
    cut_patches,
    patch_boxes,
    random_offsets,
    unshuffle,
)


def test_published_geometry_and_proportional_scaling() -> None:
    g = JigsawGeometry.for_image_size(224)
    assert (g.source_size, g.cell, g.patch_size, g.num_patches) == (255, 85, 64, 9)
    small = JigsawGeometry.for_image_size(64)
    assert small.source_size == 3 * small.cell
    assert abs(small.source_size / 64 - 255 / 224) < 0.05
    assert abs(small.patch_size / small.cell - 64 / 85) < 0.06


def test_boxes_lie_inside_their_cells() -> None:
    g = JigsawGeometry()
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        offsets = random_offsets(g, gen)
        seen.update(offsets.flatten().tolist())
        for k, (y0, x0, y1, x1) in enumerate(patch_boxes(g, offsets).tolist()):
            row, col = divmod(k, 3)
            assert row * 85 <= y0 and y1 <= (row + 1) * 85
            assert col * 85 <= x0 and x1 <= (col + 1) * 85
            assert (y1 - y0, x1 - x0) == (64, 64)
    assert seen == set(range(21))  # offsets 0..20 (VISSL's randint(0, 21)), all reachable


@pytest.mark.parametrize(
    ("geometry", "offsets"),
    [
        (JigsawGeometry(), range(21)),  # published: 85-px cells, 64-px patches
        (JigsawGeometry.for_image_size(64), range(6)),  # 24-px cells, 18-px patches
        (JigsawGeometry(6, 6, 3, 2), range(1)),  # the patch fills its cell
    ],
)
def test_offsets_take_vissls_range_in_both_paths(geometry: JigsawGeometry, offsets: range) -> None:
    """VISSL's ImgPatchesFromTensor draws randint(0, cell - patch): never cell - patch itself."""
    assert (geometry.cell, geometry.patch_size) in ((85, 64), (24, 18), (2, 2))
    pil = torch.stack(
        [random_offsets(geometry, torch.Generator().manual_seed(s)) for s in range(60)]
    )
    batched, _ = jigsaw_draw(60, geometry, torch.Generator().manual_seed(0))
    for drawn in (pil, batched):
        assert set(drawn.flatten().tolist()) == set(offsets)


def test_cut_patches_records_an_invertible_permutation() -> None:
    g = JigsawGeometry()
    source = torch.arange(3 * 255 * 255, dtype=torch.float32).reshape(3, 255, 255)
    offsets = random_offsets(g, torch.Generator().manual_seed(1))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    patches = cut_patches(source, g, offsets, perm)
    boxes = patch_boxes(g, offsets).tolist()
    for k in range(9):
        y0, x0, y1, x1 = boxes[int(perm[k])]
        assert torch.equal(patches[k], source[:, y0:y1, x0:x1])
    ordered = unshuffle(patches, perm)
    for cell in range(9):
        y0, x0, y1, x1 = boxes[cell]
        assert torch.equal(ordered[cell], source[:, y0:y1, x0:x1])


def test_transform_patches_come_from_their_cells() -> None:
    """Pixels encode their coordinates; unshuffled patch k must sit in grid cell k."""
    g = JigsawGeometry.for_image_size(64)
    yy, xx = np.mgrid[0 : g.source_size, 0 : g.source_size]
    coded = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    t = PirlTransform(g)
    t.source_crop = T.Lambda(lambda im: im)  # the whole coded image is the patch source
    t.augment = T.PILToTensor()
    torch.manual_seed(0)
    image, patches, perm = t(Image.fromarray(coded))
    assert image.shape == (3, 64, 64) and patches.shape == (9, 3, g.patch_size, g.patch_size)
    assert sorted(perm.tolist()) == list(range(9))
    for cell, patch in enumerate(unshuffle(patches, perm)):
        row, col = divmod(cell, 3)
        x_mean, y_mean = patch[0].float().mean().item(), patch[1].float().mean().item()
        assert col * g.cell <= x_mean < (col + 1) * g.cell
        assert row * g.cell <= y_mean < (row + 1) * g.cell


def test_patches_are_augmented_independently() -> None:
    g = JigsawGeometry.for_image_size(64)
    flat = Image.fromarray(np.tile(np.array([180, 90, 40], np.uint8), (80, 80, 1)))
    torch.manual_seed(0)
    _, patches, _ = PirlTransform(g)(flat)
    colours = {tuple(np.round(c, 3)) for c in patches.mean(dim=(2, 3)).numpy()}
    assert len(colours) == 9  # one uniform colour in, nine different jitters out
