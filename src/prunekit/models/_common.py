"""Helpers shared by the model families: channel scaling and weight initialisation."""

from torch import nn


def scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, rounded and kept >= 1, so thinned variants stay valid."""
    return max(1, round(channels * width_mult))


def init_weights(model: nn.Module) -> None:
    """Kaiming-init trainable convs (BN to identity) so models train from scratch without tuning.

    Convs whose weight is frozen (the option-A ``PadShortcut`` of the CIFAR ResNets) keep their fixed
    weights: they encode an operation, not a learned filter.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
