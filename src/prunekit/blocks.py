"""Residual blocks, found numerically and removed: replace f in x + f(x) by nothing (layer pruning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph import set_module
from .measure import hooked


@dataclass
class Block:
    """A residual block whose output is x + f(x); removing it keeps only x."""

    name: str
    closing_bn: str


@torch.no_grad()
def find_blocks(model: nn.Module, example_inputs: torch.Tensor) -> list[Block]:
    """Residual blocks of any model, found numerically rather than by class name.

    A module qualifies when its input and output shapes match and, with the γ and β of its last
    BatchNorm set to zero, it returns its input unchanged on the real activations of
    ``example_inputs``: then it computes x + f(x) (possibly through a ReLU that is the identity on
    its non-negative input), and replacing it by identity is exact whenever f vanishes.
    """
    captured: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inp, out):
        if len(inp) == 1 and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                and inp[0].shape == out.shape and names[m] not in captured:
            captured[names[m]] = inp[0].detach().clone()

    candidates = {n: m for n, m in model.named_modules() if n and any(
        isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.modules()) and len(list(m.children())) > 0}
    with hooked(model, [(m, hook) for m in candidates.values()]):
        model(example_inputs)
    blocks: list[Block] = []
    for name, x in captured.items():
        m = candidates[name]
        bn_name, bn = [(f"{name}.{n}", c) for n, c in m.named_modules()
                       if isinstance(c, nn.modules.batchnorm._BatchNorm)][-1]
        saved = bn.weight.detach().clone(), bn.bias.detach().clone()
        bn.weight.zero_()
        bn.bias.zero_()
        try:
            with hooked(model):
                y = m(x)
        finally:
            bn.weight.copy_(saved[0])
            bn.bias.copy_(saved[1])
        scale = float(x.abs().max())  # a tolerance relative to x, so a vanishing x cannot pass trivially
        if scale > 0 and y.shape == x.shape and torch.allclose(y, x, atol=1e-5 * scale, rtol=1e-5):
            blocks.append(Block(name, bn_name))
    # Keep the innermost block when a container (e.g. a one-block stage) shares its closing BN.
    by_bn: dict[str, Block] = {}
    for b in blocks:
        if b.closing_bn not in by_bn or len(b.name) > len(by_bn[b.closing_bn].name):
            by_bn[b.closing_bn] = b
    return sorted(by_bn.values(), key=lambda b: list(names.values()).index(b.name))


def remove_block(model: nn.Module, block: Block | str) -> None:
    """Replace a residual block by identity (its shortcut); rebuild any PruneGraph afterwards."""
    set_module(model, block.name if isinstance(block, Block) else block, nn.Identity())
