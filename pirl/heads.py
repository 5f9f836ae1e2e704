"""PIRL's projection heads: f for the whole image, g for the nine jigsaw patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageHead(nn.Module):
    """f: Linear(d, 128) on the pooled image feature, L2-normalised (PIRL eq. 5)."""

    def __init__(self, in_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(feat), dim=1)


class PatchHead(nn.Module):
    """g: Linear(d, 128) per patch, the outputs concatenated in patch order, Linear(n*128, 128),
    L2-normalised: one embedding for the whole shuffled set of patches."""

    def __init__(self, in_dim: int = 2048, out_dim: int = 128, num_patches: int = 9) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.proj = nn.Linear(in_dim, out_dim)
        self.combine = nn.Linear(num_patches * out_dim, out_dim)

    def forward(self, patch_feat: torch.Tensor) -> torch.Tensor:
        """patch_feat: (B * num_patches, d), the patches of one image consecutive."""
        per_patch = self.proj(patch_feat).reshape(-1, self.num_patches * self.proj.out_features)
        return F.normalize(self.combine(per_patch), dim=1)


class PirlHeads(nn.Module):
    """The pair (f, g); state dict keys `f.proj.*`, `g.proj.*`, `g.combine.*`."""

    def __init__(self, in_dim: int = 2048, out_dim: int = 128, num_patches: int = 9) -> None:
        super().__init__()
        self.f = ImageHead(in_dim, out_dim)
        self.g = PatchHead(in_dim, out_dim, num_patches)
