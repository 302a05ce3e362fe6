"""DepGraph's group-norm pruning as a prunekit method (``tp-group-norm``).

Fang et al. 2023 ("DepGraph: Towards Any Structural Pruning"): a channel's importance is the L2
norm of *all* parameters coupled to it (its filter, its BatchNorm scale and shift, the next layers'
input weights), and a group-level sparsity regulariser trained beforehand pushes whole groups of
unimportant channels towards zero together. Both come from Torch-Pruning: ranking by
``GroupMagnitudeImportance(p=2)`` over prunekit's coupled groups, and the regulariser is
``GroupNormPruner.regularize`` (its growing penalty: weak on important channels, up to 2^alpha
times stronger on the least important) run on prunekit's groups, so protected layers and channels
Torch-Pruning cannot map are never penalised. In a pipeline or ``prunekit compare`` the
regulariser is this method's ``sparsify`` stage; pruning without it is DepGraph "w/o SL".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..graph import PruneGraph
from ..measure import hooked
from . import STRUCTURED_OPTIONS, Context, Option, PruneResult, register
from .structured import RANKING, structured_prune

REGULARIZER_OPTIONS = (
    Option("reg", (int, float), 5e-4, "group-sparsity strength (Torch-Pruning's reg)", minimum=0),
    Option("alpha", (int, float), 4, "the least important group is penalised 2^alpha times the most important",
           minimum=0, maximum=16),
)


def group_sparsity(model: nn.Module, settings: dict, total_steps: int, example_inputs: torch.Tensor,
                   ignored_layers: list | None = None) -> Callable[[nn.Module], None]:
    """The ``sparsify`` stage's hook: Torch-Pruning's group-norm regulariser on prunekit's groups."""
    x = example_inputs[:1].to(next(model.parameters()).device)
    groups = [g.tp_group for g in PruneGraph(model, x, ignored_layers=ignored_layers).groups]
    with hooked(model, grad=True):  # its trace is a forward: eval mode keeps BN statistics as they are
        pruner = tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=settings["reg"])
    pruner._groups = groups  # prunekit's groups: protected layers and unmapped channels left out
    alpha = 2.0 ** settings["alpha"]

    def hook(m: nn.Module) -> None:
        pruner.regularize(m, alpha=alpha)

    return hook


@register("tp-group-norm", "DepGraph group-norm importance over all coupled parameters, with its group-sparsity "
          "regulariser as the sparsify stage (Torch-Pruning, Fang 2023)",
          options=(*STRUCTURED_OPTIONS, replace(RANKING, default="global")),
          regularizer=group_sparsity, regularizer_options=REGULARIZER_OPTIONS)
def tp_group_norm(model: nn.Module, ctx: Context, *, speedup: float | None, **opts: Any) -> PruneResult:
    return structured_prune(model, ctx, method="tp-group-norm", criterion="group-norm",
                            speedup=speedup or 1.0, **opts)
