"""Trunk: torchvision names and shapes, every stage; heads: shapes, norms, patch order."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pirl.heads import PirlHeads
from pirl.trunk import build_trunk


def test_resnet50_state_dict_equals_torchvision_without_fc() -> None:
    ours = build_trunk("resnet50").state_dict()
    ref = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if "fc." not in k}
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    build_trunk("resnet50").load_state_dict(ref, strict=True)


@pytest.mark.parametrize(
    "arch,width,channels",
    [
        ("resnet18", 1.0, (64, 64, 128, 256, 512)),
        ("resnet50", 0.25, (16, 64, 128, 256, 512)),
    ],
)
def test_stages_have_expected_shapes(arch: str, width: float, channels: tuple[int, ...]) -> None:
    trunk = build_trunk(arch, width).eval()
    out = trunk(torch.randn(2, 3, 64, 64), stages=("conv1", "res2", "res3", "res4", "res5"))
    sides = (32, 16, 8, 4, 2)
    for (name, t), c, s in zip(out.items(), channels, sides, strict=True):
        assert t.shape == (2, c, s, s), name
        assert trunk.channels[name] == c


def test_torchvision_forward_matches_ours() -> None:
    ref = torchvision.models.resnet18().eval()
    trunk = build_trunk("resnet18").eval()
    trunk.load_state_dict({k: v for k, v in ref.state_dict().items() if "fc." not in k})
    x = torch.randn(1, 3, 64, 64)
    feats = torch.nn.Sequential(*list(ref.children())[:-1])(x).flatten(1)
    torch.testing.assert_close(trunk.pooled(x), feats)


def test_heads_shapes_norms_and_patch_order() -> None:
    torch.manual_seed(0)
    heads = PirlHeads(in_dim=32, out_dim=8)
    f = heads.f(torch.randn(4, 32))
    patch_feats = torch.randn(4 * 9, 32)
    g = heads.g(patch_feats)
    assert f.shape == g.shape == (4, 8)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(g.norm(dim=1), torch.ones(4))
    assert heads.g.combine.in_features == 9 * 8
    swapped = patch_feats.reshape(4, 9, 32)[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]].reshape(36, 32)
    assert not torch.allclose(heads.g(swapped), g)  # g sees the patches in order
