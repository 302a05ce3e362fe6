"""Masks that keep unstructured sparsity through training (S4 magnitude's retraining)."""

from __future__ import annotations

import torch
from torch import nn

from .measure import WEIGHTED


class Masks:
    """Binary masks on weights that stay enforced through training.

    Gradients of masked weights are zeroed by a hook, and ``after_step`` multiplies the weights
    again after each optimiser step, so neither momentum nor weight decay can revive them.
    """

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self._handles: list = []

    @classmethod
    def from_zeros(cls, model: nn.Module) -> Masks:
        """Masks that freeze the zero pattern of a pruned model (e.g. loaded from a sparse file) for training."""
        return cls({f"{name}.weight": m.weight.detach() != 0 for name, m in model.named_modules()
                    if isinstance(m, WEIGHTED) and m.weight.requires_grad and bool((m.weight == 0).any())})

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def attach(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            m = mask.to(params[name].device)
            self._handles.append(params[name].register_hook(lambda g, m=m: g * m.to(g.dtype)))
        self.apply(model)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def after_step(self, model: nn.Module) -> None:
        self.apply(model)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(float(m.sum()) for m in self.masks.values()) / max(total, 1)
