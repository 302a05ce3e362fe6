"""Torch-Pruning's first-order Taylor importance as a prunekit method (``tp-taylor``).

Molchanov et al. 2019 ("Importance Estimation for Neural Network Pruning"): the loss change of
removing a channel is estimated to first order by |Σ w·∂L/∂w| over its weights. Torch-Pruning's
``GroupTaylorImportance`` sums that over every coupled member of a group (DepGraph). The gradients
come from the task's loss on a few calibration batches of the training split, accumulated as
Torch-Pruning's own benchmark does; then channels are ranked (globally by default, as Torch-Pruning's
published runs do) and removed to the MACs target. It is here as the anchor ``prunekit compare``
measures the seed methods against, under the same budget.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..measure import hooked
from . import STRUCTURED_OPTIONS, Context, Option, PruneResult, register
from .structured import RANKING, structured_prune

BATCHES = Option("batches", int, 10, "calibration batches whose loss gradients the Taylor scores accumulate",
                 minimum=1)


@register("tp-taylor", "first-order Taylor importance |w·dL/dw| over the coupled group (Torch-Pruning, "
          "Molchanov 2019); needs data", options=(*STRUCTURED_OPTIONS, replace(RANKING, default="global"), BATCHES),
          needs_data=True)
def tp_taylor(model: nn.Module, ctx: Context, *, speedup: float | None, batches: int, **opts: Any) -> PruneResult:
    calib = ctx.batches(batches, "data", "tp-taylor")
    grads = {p: p.grad for p in model.parameters()}  # the caller's gradients are put back afterwards
    model.zero_grad(set_to_none=True)
    try:
        with hooked(model, grad=True):  # eval mode: BN statistics of the model stay as they are
            for x, y, *_ in calib:
                (ctx.task.loss(model(x), y) / len(calib)).backward()
        for p in model.parameters():  # a parameter the loss does not reach (e.g. a pad shortcut's) scores 0
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        result = structured_prune(model, ctx, method="tp-taylor", criterion="taylor",
                                  speedup=speedup or 1.0, **opts)
    finally:
        for p in model.parameters():
            p.grad = grads.get(p)  # pruned parameters are new tensors: they get None
    result.info["batches"] = len(calib)
    return result
