"""NCE as PIRL's reference uses it, InfoNCE, and the lambda mix of the two PIRL terms."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pirl.memory import MemoryBank, distributed

# VISSL's NCECriterion adds float32's machine epsilon to every denominator; with 32,000
# negatives at c = N / |D| = 0.025 it moves the loss by about N * EPS / c = 0.15 nats.
EPS = float(torch.finfo(torch.float32).eps)


class NCELoss(nn.Module):
    """Noise-contrastive estimation against a memory bank (Wu et al. 2018; PIRL eq. 2-3).

    s_j = <m_j, z> / T, P_j = exp(s_j) / Z, Z = mean(exp(s)) * |D| fixed at the first call
    (or tracked by EMA with z_momentum > 0); one instance serves every term that shares Z.
    With c = N / |D| and VISSL's eps = float32 machine epsilon, per sample:
        -log(P_0 / (P_0 + c + eps)) - sum_j log(c / (P_j + c + eps)),
    computed as softplus(log(c + eps) - log P_0) + sum_j softplus(log(P_j + eps) - log c).
    """

    def __init__(self, data_size: int, temperature: float = 0.07, z_momentum: float = 0.0) -> None:
        super().__init__()
        self.data_size, self.temperature, self.z_momentum = data_size, temperature, z_momentum
        self.register_buffer("log_z", torch.tensor(float("nan"), dtype=torch.float64))
        self._z_set = False  # known set: no device sync per step to look at log_z

    def forward(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """pos: (B,) and neg: (B, N) raw inner products; returns the batch-mean loss."""
        s = torch.cat([pos.unsqueeze(1), neg], dim=1).float() / self.temperature
        first = not self._z_set and bool(torch.isnan(self.log_z))
        self._z_set = True
        if first or self.z_momentum > 0:  # a fixed Z costs nothing after the first step
            with torch.no_grad():
                batch_log_z = self._batch_log_z(s)
                if first:
                    self.log_z.copy_(batch_log_z)
                else:
                    m = self.z_momentum
                    z = m * self.log_z.exp() + (1 - m) * batch_log_z.exp()
                    self.log_z.copy_(z.log())
        log_p = s - self.log_z.float()
        c = neg.shape[1] / self.data_size
        log_eps = math.log(EPS)
        log_p_neg = log_eps + F.softplus(log_p[:, 1:] - log_eps)  # log(P_j + eps), no new tensor
        loss = F.softplus(math.log(c + EPS) - log_p[:, 0])
        loss = loss + F.softplus(log_p_neg - math.log(c)).sum(1)
        return loss.mean()

    def _batch_log_z(self, s: torch.Tensor) -> torch.Tensor:
        """log(mean(exp(s)) * |D|), the batch mean averaged over ranks as VISSL averages it
        (arithmetically), so every replica fixes the same Z."""
        mean = torch.logsumexp(s.double().flatten(), 0).sub(math.log(s.numel())).exp()
        if distributed():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        return mean.log() + math.log(self.data_size)


class InfoNCELoss(nn.Module):
    """Softmax cross-entropy over [positive, negatives] / T (van den Oord et al. 2018)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float() / self.temperature
        return F.cross_entropy(
            logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        )


class PirlLoss(nn.Module):
    """L = lam * NCE(m_I, g(v_I^t)) + (1 - lam) * NCE(m_I, f(v_I)); lam = 0 is NPID++.

    As VISSL's single NCEAverage: the two terms share one normaliser Z, which the first term
    computed fixes (the patch term g; the image term f under NPID++), and each term draws its
    own negatives from the bank, g's first: N per sample by default, as VISSL draws them;
    shared_negatives draws one set of N per batch and term (one gather of N rows and one
    (B, N) product instead of B*N rows), a cheaper variant that is not the reference's.
    """

    def __init__(
        self,
        memory: MemoryBank,
        num_negatives: int = 32000,
        temperature: float = 0.07,
        lam: float = 0.5,
        loss: str = "nce",
        z_momentum: float = 0.0,
        shared_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.memory, self.num_negatives, self.lam = memory, num_negatives, lam
        self.shared_negatives = shared_negatives

        if loss == "nce":
            self.criterion: nn.Module = NCELoss(memory.size, temperature, z_momentum)
        elif loss == "infonce":
            self.criterion = InfoNCELoss(temperature)
        else:
            raise ValueError(f"unknown loss {loss!r}; choose nce or infonce")

    def term(self, z: torch.Tensor, idx: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """One term's loss: z against its bank row and its own draw of negatives."""
        shape = (self.num_negatives,) if self.shared_negatives else (len(z), self.num_negatives)
        neg_idx = self.memory.sample(shape, gen)
        pos = (self.memory.bank[idx].to(z.dtype) * z).sum(1)
        return self.criterion(pos, self.memory.scores(z, neg_idx))

    def terms(
        self,
        f: torch.Tensor,
        g: torch.Tensor | None,
        idx: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each term's loss by name, so a run can show which term learns: "patch" (g, first, as
        VISSL: it fixes the shared Z) unless lam = 0, then "image" (f)."""
        out = {} if self.lam == 0 else {"patch": self.term(g, idx, generator)}
        out["image"] = self.term(f, idx, generator)
        return out

    def mix(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """lam * patch + (1 - lam) * image; the image term alone under NPID++."""
        if "patch" not in terms:
            return terms["image"]
        return self.lam * terms["patch"] + (1 - self.lam) * terms["image"]

    def forward(
        self,
        f: torch.Tensor,
        g: torch.Tensor | None,
        idx: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """f, g: unit embeddings of the image and its patches; idx: data-set indices."""
        return self.mix(self.terms(f, g, idx, generator))
