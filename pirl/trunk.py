"""ResNet trunk returning every stage, with torchvision's parameter names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

STAGES = ("conv1", "res2", "res3", "res4", "res5")
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class Trunk(nn.Module):
    """A torchvision ResNet without `fc` whose forward can return any of its stages.

    Parameter names equal torchvision's (`conv1`, `bn1`, `layer1`..`layer4`), so a
    torchvision state dict minus `fc` loads with `strict=True` when `width == 1`.
    Stage outputs follow VISSL's names: conv1 (after ReLU), res2..res5 (layer1..4).
    """

    def __init__(self, arch: str = "resnet50", width: float = 1.0) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
        block, layers = ARCHS[arch]
        self.arch, self.width = arch, width
        base = max(8, int(round(64 * width)))
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base, layers[0], 1)
        self.layer2 = self._make_layer(block, base * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], 2)
        self.channels = {
            "conv1": base,
            **{f"res{i + 2}": base * 2**i * block.expansion for i in range(4)},
        }
        self.out_dim = self.channels["res5"]
        self._init_weights()

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, stages: Sequence[str] = ("res5",)
    ) -> dict[str, torch.Tensor]:
        """Run only as deep as the deepest requested stage and return those stages by name."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
        last = max(STAGES.index(s) for s in stages)
        out: dict[str, torch.Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        if "conv1" in stages:
            out["conv1"] = x
        x = self.maxpool(x)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if i + 1 > last:
                break
            x = layer(x)
            name = f"res{i + 2}"
            if name in stages:
                out[name] = x
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """res5 global-average-pooled: the representation PIRL's heads take."""
        return self.forward(x, ("res5",))["res5"].mean(dim=(2, 3))


def build_trunk(arch: str = "resnet50", width: float = 1.0) -> Trunk:
    """Build a randomly initialised trunk; the one constructor every command uses."""
    return Trunk(arch, width)
