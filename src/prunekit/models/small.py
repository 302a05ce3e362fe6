"""A small CNN for the 1x8x8 sklearn digits images: a quick, CPU-sized pruning target."""

import torch
from torch import nn

from prunekit.models._common import init_weights


def _conv_bn_relu(in_planes: int, out_planes: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_planes),
        nn.ReLU(),
    ]


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (32, 64, 64/stride 2, 128), global average pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64, stride=2),
            *_conv_bn_relu(64, 128),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(128, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.avgpool(self.features(x)), 1))
