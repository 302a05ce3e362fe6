"""Importance of each channel of a coupled group.

Scores are Torch-Pruning's importance estimators applied to the whole group, so a channel's
score combines every coupled member (conv filters, BN scales, the next layers' input weights):
the DepGraph reading of each baseline. Higher means more important.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .graph import Group

_CONV_LINEAR = [nn.modules.conv._ConvNd, nn.Linear]

_IMPORTANCE = {
    # Li et al. 2017: smallest-norm filters are least important.
    "l1-norm": lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, target_types=_CONV_LINEAR),
    "l2-norm": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None, target_types=_CONV_LINEAR),
    # He et al. 2019: filters nearest the geometric median are the most replaceable.
    "fpgm": lambda: tp.importance.FPGMImportance(p=2, normalizer=None),
    # Liu et al. 2017: BN scale factor |γ|.
    "net-slim": lambda: tp.importance.BNScaleImportance(normalizer=None),
}

NAMES = (*_IMPORTANCE, "random")


def scores(group: Group, criterion: str, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Per-channel importance of ``group`` (length ``group.size``), or None if the criterion has no data."""
    if criterion == "random":
        return torch.rand(group.size, generator=generator)
    if criterion not in _IMPORTANCE:
        raise ValueError(f"unknown criterion {criterion!r}")
    with torch.no_grad():
        s = _IMPORTANCE[criterion]()(group.tp_group)
    return None if s is None else s.detach().float().cpu()


def bn_gamma(model: nn.Module, group: Group) -> torch.Tensor | None:
    """|γ| of the group's channels, max over the group's BNs (the mask-union rule for coupled channels)."""
    if not group.bns:
        return None
    gammas = [model.get_submodule(n).weight.detach().abs().float().cpu() for n in group.bns]
    return torch.stack([g[: group.size] for g in gammas if g.numel() >= group.size]).amax(0)
