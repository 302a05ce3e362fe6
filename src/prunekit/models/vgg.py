"""CIFAR VGG with batch norm (the common CIFAR form: 3x3 conv-BN-ReLU stacks, 5 max-pools, one Linear).

At 32x32 the five pools leave a 1x1x512 map, so the classifier is a single ``Linear(512, classes)``
instead of ImageNet VGG's three 4096-wide layers; a global average pool keeps it valid at other sizes.
"""

import torch
from torch import nn

from prunekit.models._common import init_weights, scaled

# Channel counts, "M" = 2x2 max-pool (Simonyan & Zisserman 2015, configurations D and E).
CONFIGS: dict[int, list[int | str]] = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class CifarVGG(nn.Module):
    """VGG-``depth`` (16 or 19) with BN for 32x32 inputs; ``width_mult`` scales every conv width."""

    def __init__(
        self, depth: int, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = scaled(int(item), width_mult)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
