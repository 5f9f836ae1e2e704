"""What every pretext trainer (PIRL / NPID++ in pirl/pretrain.py, the Jigsaw baseline in
pirl/jigsaw_pretext.py) holds: model, loss, optimizer and counters, its checkpoint and resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CHECKPOINT_VERSION = 2  # 2: one shared NCE normaliser (nce: criterion.log_z)


@dataclass
class PretextTrainer:
    """Model (trunk + heads), criterion, optimizer and the epoch/step counters; subclasses add
    what their pretext keeps (PIRL's memory bank) and define the step's loss."""

    cfg: Any  # pirl.pretrain.PretrainConfig
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0

    def memory_state(self) -> dict[str, Any] | None:
        """The memory bank's checkpoint entry (None without a bank)."""
        return None

    def load_memory(self, state: dict[str, Any] | None) -> None:
        """Restore what memory_state wrote."""

    def invariance_heads(self) -> nn.Module | None:
        """Heads with f and g whose invariance the monitor reports (None: the pretext has none)."""
        return None

    def state(self) -> dict[str, Any]:
        """The native checkpoint (README: the checkpoint), one layout for every pretext."""
        return {
            "trunk": self.model.trunk.state_dict(),
            "heads": self.model.heads.state_dict(),
            "memory": self.memory_state(),
            "nce": {k: v for k, v in self.criterion.state_dict().items() if "log_z" in k},
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "version": CHECKPOINT_VERSION,
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore from a native checkpoint (through RunDir.restore, which turns a mismatch
        into one line); shapes must match the configured model."""
        self.model.trunk.load_state_dict(ckpt["trunk"])
        self.model.heads.load_state_dict(ckpt["heads"])
        self.load_memory(ckpt["memory"])
        missing = self.criterion.load_state_dict(ckpt["nce"], strict=False).missing_keys
        if any("log_z" in k for k in missing):
            raise KeyError(f"nce: no {missing[0]} (written before Z was shared)")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])

    def remember(self, idx: torch.Tensor, embedding: torch.Tensor) -> None:
        """After the step: store the batch's embeddings (PIRL's memory bank; nothing here)."""

    def update(
        self, loss: torch.Tensor, lr: float, idx: torch.Tensor, embedding: torch.Tensor | None
    ) -> None:
        """One SGD step at this LR (after the loop has checked the loss is finite), then the
        memory of the batch's embeddings where the pretext keeps one."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if embedding is not None:
            self.remember(idx, embedding)
