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
    # DepGraph (Fang et al. 2023): L2 norm over every coupled parameter of the group, BN included.
    "group-norm": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    # Molchanov et al. 2019: first-order Taylor |w·∂L/∂w| over the group; needs gradients on the weights.
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None),
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


def distribution_fit_keep(norms: torch.Tensor, keep: int, filters: torch.Tensor | None = None,
                          tol: float = 0.1) -> list[int]:
    """Which ``keep`` channels best preserve the distribution of ``norms`` (S1 dist-fit).

    Quantile-stratified selection: with norms sorted and split into ``keep`` equal strata, keep
    from stratum j the channel at the empirical quantile (j + 0.5) / keep. This minimises the 1-D
    Wasserstein distance between the kept and the original norm distributions, where keeping the
    largest norms skews it. Redundancy tie-break: among the stratum's channels whose norm is within
    ``tol`` standard deviations of the pick, keep the one least cosine-similar to the channels
    already kept, i.e. delete the redundant one.
    """
    n = len(norms)
    if keep >= n:
        return list(range(n))
    order = torch.argsort(norms, stable=True).tolist()
    feats = None if filters is None else torch.nn.functional.normalize(filters.flatten(1).float(), dim=1)
    window = tol * float(norms.float().std()) if n > 1 else 0.0
    kept: list[int] = []
    for j in range(keep):
        lo, hi = round(j * n / keep), round((j + 1) * n / keep)  # disjoint, non-empty strata
        stratum = order[lo:hi]
        pick = order[min(max(int((j + 0.5) * n / keep), lo), hi - 1)]
        near = [c for c in stratum if abs(float(norms[c] - norms[pick])) <= window]
        if feats is not None and kept and len(near) > 1:
            sim = (feats[near] @ feats[kept].T).abs().amax(1)
            pick = near[int(torch.argmin(sim))]
        kept.append(pick)
    return sorted(kept)


def root_filters(group: Group) -> torch.Tensor:
    """The root layer's output filters of ``group``, one row per channel (for similarity)."""
    w = group.root.weight.detach()
    if getattr(group.root, "transposed", False):  # (in, out / groups, *kernel): output channels on dim 1
        w = w.transpose(0, 1)
    return w[: group.size].flatten(1).float().cpu()
