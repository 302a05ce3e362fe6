"""Compensation for what a method removes: exact per-layer weight edits done before the surgery."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_constant_into(consumer: nn.Module, channels: list[int], values: torch.Tensor,
                       bn: nn.modules.batchnorm._BatchNorm | None = None) -> None:
    """A removed input channel that carried the constant ``values[i]`` adds W[:, c]·v to every output.

    Fold that into the consumer's bias, or, for a bias-free conv followed by BN, into the BN's
    running mean (BN(y + d) == BN'(y) with mean' = mean - d). Exact except at zero-padded borders.
    """
    w = consumer.weight
    per_in = w[:, channels].flatten(2).sum(-1) if w.dim() > 2 else w[:, channels]
    delta = per_in @ values.to(w.dtype)
    if consumer.bias is not None:
        consumer.bias += delta
    elif bn is not None:
        bn.running_mean -= delta
    else:
        consumer.bias = nn.Parameter(delta.clone())


@torch.no_grad()
def merge_input_channel(consumer: nn.Module, src: int, dst: int, scale: float, offset: float = 0.0) -> None:
    """If input channel ``src`` ≈ scale·x_dst + offset, move its weights onto ``dst`` before removing it."""
    w = consumer.weight
    w[:, dst] += scale * w[:, src]
    if offset:
        fold_constant_into(consumer, [src], torch.tensor([offset]))
    w[:, src] = 0
