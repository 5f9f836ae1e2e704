"""Positive and negative controls for `analyze invariance`: a representation invariant to the
jigsaw transform by construction, one that is not, and the invariant one analysed with each image
paired with another image's patches. The analysis must tell them apart at the heads and at res5.

The images are 3x3 grids of uniform colour blocks, one colour per cell, 96 px: the analysis cuts
each cell's centre patch (27 px of a 36-px cell of the 108-px source), so a patch holds one colour.

- Invariant trunk: pointwise. conv1 keeps relu(+x) and relu(-x) of each input channel from one
  kernel tap, every residual branch is zero, every downsampling 1x1 conv copies its channels. Each
  res5 pixel of the whole image is then the colour of one point inside its cell (the tap is the
  last of the 7x7 kernel, so the point lies 1-5 px inside the cell, clear of the resizing's blur
  at the cell's edge), and a patch's is its own colour: identical by construction.
  Invariant heads: g averages its nine slots (combine = [A/9, ..., A/9]) and f = A proj_g, so
  f(image) = g(patches) whenever the image's pooled res5 equals the patches' mean.
- Not invariant: the same trunk, except that layer4's first block drops its shortcut and its
  residual branch shifts the map one res5 pixel down and right, plus a constant. A cell is
  represented by its diagonal neighbour's colour (or nothing, at the far edges): context the
  patch does not have. A patch alone shifts into zero padding, so every patch is represented by
  the same constant, and the jigsaw view carries nothing of its image: own = other, ratio 1.
  Its heads are PIRL's random initialisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import pirl.invariance
from pirl.heads import PirlHeads
from pirl.trunk import Trunk, build_trunk
from pirl_tools.main import main
from tests.conftest import write_image_folder

SIZE = 96  # res5 of the whole image is 3x3: one pixel per jigsaw cell


def colour_blocks(n: int, seed: int) -> list[np.ndarray]:
    """n images of 3x3 uniform blocks of random colours."""
    rng = np.random.default_rng(seed)
    cell = np.ones((SIZE // 3, SIZE // 3, 1), dtype=np.uint8)
    return [np.kron(rng.integers(0, 256, (3, 3, 3)).astype(np.uint8), cell) for _ in range(n)]


def pointwise_trunk() -> Trunk:
    """A ResNet-18 (width 1/8) that maps each point's colour to relu(+-x), subsampled."""
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.125).eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.zero_()
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)  # eval mode, running mean 0 and var 1: the identity
        for c in range(3):
            trunk.conv1.weight[c, c, 6, 6] = 1.0
            trunk.conv1.weight[c + 3, c, 6, 6] = -1.0
        for layer in (trunk.layer2, trunk.layer3, trunk.layer4):
            shortcut = layer[0].downsample[0].weight
            for c in range(shortcut.shape[1]):
                shortcut[c, c, 0, 0] = 1.0
    return trunk


def context_trunk() -> Trunk:
    """pointwise_trunk, but res5 holds the diagonal neighbour's colour plus a constant."""
    trunk = pointwise_trunk()
    block = trunk.layer4[0]
    with torch.no_grad():
        block.downsample[0].weight.zero_()
        for c in range(block.conv1.in_channels):
            block.conv1.weight[c, c, 2, 2] = 1.0  # stride 2: res4 pixel 2k + 1
            block.conv2.weight[c, c, 2, 2] = 1.0  # and one res5 pixel on: 2k + 3
        block.bn2.bias.fill_(0.1)
    return trunk


def invariant_heads(trunk: Trunk) -> PirlHeads:
    torch.manual_seed(1)
    heads = PirlHeads(trunk.out_dim, 16)
    with torch.no_grad():
        a = torch.randn(16, 16)
        heads.g.combine.weight.copy_(torch.cat([a / 9] * 9, dim=1))
        heads.g.combine.bias.zero_()
        heads.f.proj.weight.copy_(a @ heads.g.proj.weight)
        heads.f.proj.bias.copy_(a @ heads.g.proj.bias)
    return heads


def save(path: Path, trunk: Trunk, heads: PirlHeads) -> str:
    torch.save({"trunk": trunk.state_dict(), "heads": heads.state_dict(), "version": 2}, path)
    return str(path)


@pytest.fixture
def analysed(tmp_path: Path):
    """Run `analyze invariance` on the two models; returns a function of the pairing."""
    data = tmp_path / "data"
    write_image_folder(data / "train", colour_blocks(8, 0), np.arange(8) % 2)
    write_image_folder(data / "val", colour_blocks(16, 1), np.arange(16) % 2)
    trunk = pointwise_trunk()
    invariant = save(tmp_path / "invariant.pth", trunk, invariant_heads(trunk))
    torch.manual_seed(2)
    context = context_trunk()
    not_invariant = save(tmp_path / "context.pth", context, PirlHeads(context.out_dim, 16))

    def run(name: str) -> pd.DataFrame:
        out = tmp_path / name
        args = (
            f"analyze invariance --weights invariant={invariant} "
            f"--weights context={not_invariant} --data {data} --out {out} "
            f"--image-size {SIZE} --device cpu --num-workers 0 --batch-size 64"
        ).split()
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out / "invariance.csv")
        return table.set_index(["model", "layer"])

    return run


def test_analysis_separates_invariant_from_covariant_representations(analysed) -> None:
    table = analysed("controls")
    for layer in ("res5", "f-g"):
        assert table.loc[("invariant", layer), "ratio"] < 0.05, layer
        assert table.loc[("invariant", layer), "self_match"] == 1.0, layer
        assert table.loc[("context", layer), "ratio"] == pytest.approx(1.0, abs=1e-6), layer
        assert table.loc[("context", layer), "self_match"] <= 1 / 16, layer


def test_analysis_finds_nothing_when_images_get_other_images_patches(analysed, monkeypatch) -> None:
    """The same invariant model, with image i's jigsaw view cut from image i + 1: the low ratio
    above comes from pairing each image with its own patches, not from the representation."""
    own = pirl.invariance.JigsawPatches.patches

    def neighbours(self, i: int) -> torch.Tensor:
        return own(self, (i + 1) % len(self.images))

    monkeypatch.setattr(pirl.invariance.JigsawPatches, "patches", neighbours)
    table = analysed("mispaired")
    for layer in ("res5", "f-g"):
        assert 0.85 < table.loc[("invariant", layer), "ratio"] < 1.15, layer
        assert table.loc[("invariant", layer), "self_match"] <= 3 / 16, layer  # chance 1 / 16
