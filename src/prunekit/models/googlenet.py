"""CIFAR GoogLeNet (Szegedy et al. 2015) in the layout of kuangliu/pytorch-cifar.

A single 3x3 conv (192 channels) replaces the ImageNet stem, followed by Inception a3..b5, global average
pooling and ``Linear(1024, classes)``: ~6.2M params, ~1.5 G MACs at 32x32. ``width_mult`` thins every
branch and ``stem_stride=2`` halves the resolution after the stem (~4x fewer MACs), for cheaper variants.
"""

import torch
from torch import nn

from prunekit.models._common import init_weights, scaled

# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) per Inception module, as in the paper's Table 1.
# None marks the stride-2 max-pools between stages.
INCEPTION_CFG: list[tuple[int, int, int, int, int, int] | None] = [
    (64, 96, 128, 16, 32, 32),  # a3
    (128, 128, 192, 32, 96, 64),  # b3
    None,
    (192, 96, 208, 16, 48, 64),  # a4
    (160, 112, 224, 24, 64, 64),  # b4
    (128, 128, 256, 24, 64, 64),  # c4
    (112, 144, 288, 32, 64, 64),  # d4
    (256, 160, 320, 32, 128, 128),  # e4
    None,
    (256, 160, 320, 32, 128, 128),  # a5
    (384, 192, 384, 48, 128, 128),  # b5
]


def conv_bn_relu(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """The conv-BN-ReLU unit every GoogLeNet branch is built from."""
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_planes),
        nn.ReLU(),
    )


class Inception(nn.Module):
    """Four parallel branches (1x1, 3x3, "5x5" as two 3x3, pool+1x1) concatenated on channels."""

    def __init__(
        self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int
    ) -> None:
        super().__init__()
        self.b1 = conv_bn_relu(in_planes, n1x1, 1)
        self.b2 = nn.Sequential(conv_bn_relu(in_planes, n3x3red, 1), conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(
            conv_bn_relu(in_planes, n5x5red, 1), conv_bn_relu(n5x5red, n5x5, 3), conv_bn_relu(n5x5, n5x5, 3)
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_planes, pool_planes, 1))
        self.out_planes = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class CifarGoogLeNet(nn.Module):
    """GoogLeNet for 32x32 inputs; see the module docstring for ``width_mult`` and ``stem_stride``."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, stem_stride: int = 1
    ) -> None:
        super().__init__()
        stem = scaled(192, width_mult)
        self.pre_layers = conv_bn_relu(in_channels, stem, 3, stride=stem_stride)
        stages: list[nn.Module] = []
        planes = stem
        for cfg in INCEPTION_CFG:
            if cfg is None:
                stages.append(nn.MaxPool2d(3, stride=2, padding=1))
            else:
                block = Inception(planes, *(scaled(c, width_mult) for c in cfg))
                stages.append(block)
                planes = block.out_planes
        self.inceptions = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inceptions(self.pre_layers(x))
        return self.linear(torch.flatten(self.avgpool(out), 1))
