"""CIFAR ResNets (He et al., 2016, section 4.2): 3 stages of 16/32/64 channels, n BasicBlocks each.

The paper's option-A shortcut (parameter-free: subsample by 2 and zero-pad the new channels) is written as
a frozen 1x1 conv, ``PadShortcut``, so that dependency tracers such as Torch-Pruning see an ordinary conv
and keep the residual adds consistent when channels are removed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.models._common import init_weights


class PadShortcut(nn.Conv2d):
    """Option-A shortcut as a frozen 1x1 stride-2 conv with a fixed 0/1 selection matrix.

    ``weight[i, i, 0, 0] = 1`` for ``i < in_planes``, everything else 0, and ``requires_grad=False``:
    the output equals ``x[:, :, ::2, ::2]`` zero-padded from ``in_planes`` to ``out_planes`` channels,
    exactly as in the paper (no learned parameters). Expressing it as a conv instead of slicing+``F.pad``
    lets Torch-Pruning trace the channel coupling of the residual add; after pruning the weight is a
    sub-matrix of the selection matrix and is still a selection. A dedicated class lets pruning code
    recognise it (e.g. to leave it out of importance ranking).
    """

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__(in_planes, out_planes, kernel_size=1, stride=2, bias=False)
        self.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Set the selection matrix; ``nn.Conv2d.__init__`` calls this, so it is never random."""
        with torch.no_grad():
            self.weight.zero_()
            idx = torch.arange(min(self.in_channels, self.out_channels))
            self.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the detached weight: pruners (Torch-Pruning included) replace the Parameter with
        a fresh one that requires grad, and the shortcut must stay fixed through fine-tuning anyway."""
        return self._conv_forward(x, self.weight.detach(), None)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A (``PadShortcut``) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        same_shape = stride == 1 and in_planes == planes
        self.shortcut: nn.Module = nn.Identity() if same_shape else PadShortcut(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs, ``depth = 6n + 2`` (20, 32, 44, 56, 110, ...)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))
