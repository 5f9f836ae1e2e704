"""Memory bank: one unit vector per training image, an EMA of its f-embedding."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MemoryBank(nn.Module):
    """m_i <- normalize(momentum * m_i + (1 - momentum) * f(v_i)), no gradient (PIRL sec. 3.2).

    Under DDP every rank holds a full replica and applies the (index, f) updates gathered from
    all ranks in rank order, so the replicas stay identical.
    """

    def __init__(self, size: int, dim: int = 128, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.momentum = momentum
        g = torch.Generator().manual_seed(seed)
        bank = torch.rand(size, dim, generator=g) * 2 - 1
        self.register_buffer("bank", F.normalize(bank, dim=1))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Negative indices drawn uniformly from the whole data set, in one call."""
        return torch.randint(0, self.size, shape, generator=generator, device="cpu").to(
            self.bank.device
        )

    def scores(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """<m_idx[b, j], z[b]> for idx (B, N): via one (B, |D|) product when the bank is smaller
        than N (cheaper than gathering B*N rows), else a batched gather + bmm."""
        bank = self.bank.to(z.dtype)
        if self.size <= idx.shape[1]:
            return (z @ bank.T).gather(1, idx)
        return torch.bmm(bank[idx], z.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, feats: torch.Tensor) -> None:
        """EMA update in place; gathers every rank's updates first under DDP."""
        feats = feats.detach().to(self.bank.dtype)
        if distributed():
            world = dist.get_world_size()
            sizes = [torch.zeros(1, dtype=torch.long, device=idx.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([idx.numel()], device=idx.device))
            n_max = int(max(s.item() for s in sizes))
            pad_idx = torch.zeros(n_max, dtype=idx.dtype, device=idx.device)
            pad_feat = torch.zeros(n_max, feats.shape[1], dtype=feats.dtype, device=feats.device)
            pad_idx[: idx.numel()], pad_feat[: idx.numel()] = idx, feats
            all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
            all_feat = [torch.empty_like(pad_feat) for _ in range(world)]
            dist.all_gather(all_idx, pad_idx)
            dist.all_gather(all_feat, pad_feat)
            idx = torch.cat([i[: int(s.item())] for i, s in zip(all_idx, sizes, strict=True)])
            feats = torch.cat([f[: int(s.item())] for f, s in zip(all_feat, sizes, strict=True)])
        mixed = self.momentum * self.bank[idx] + (1 - self.momentum) * feats
        self.bank[idx] = F.normalize(mixed, dim=1)
