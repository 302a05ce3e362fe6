"""CIFAR MobileNetV2 (Sandler et al. 2018) in the layout of kuangliu/pytorch-cifar.

For 32x32 inputs the stem conv and the first strided stage (24 channels) use stride 1, so the final map
is 4x4 rather than 1x1. Like kuangliu's version it uses ReLU (not ReLU6) and a 1x1 conv+BN shortcut on
stride-1 blocks that change width, which gives ~2.3M params.
"""

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.models._common import init_weights, scaled

# (expansion, out_planes, num_blocks, stride) per stage; stage 2 stride 2 -> 1 for CIFAR.
STAGES: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1); residual only on stride-1 blocks."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module | None
        if stride != 1:
            self.shortcut = None
        elif in_planes == out_planes:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out if self.shortcut is None else out + self.shortcut(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs; ``width_mult`` scales every width, including the 1280 head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        stem = scaled(32, width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks: list[nn.Module] = []
        planes = stem
        for expansion, out, num_blocks, stride in STAGES:
            out = scaled(out, width_mult)
            for i in range(num_blocks):
                blocks.append(InvertedResidual(planes, out, expansion, stride if i == 0 else 1))
                planes = out
        self.layers = nn.Sequential(*blocks)
        head = scaled(1280, width_mult)
        self.conv2 = nn.Conv2d(planes, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))
