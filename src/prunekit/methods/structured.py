"""What structured (channel-removing) methods share: the options that shape the PruneGraph, the BN-|γ|
sparsity regulariser of their ``sparsify`` stages, and the cost a PruneResult records."""

from __future__ import annotations

import torch
from torch import nn

from ..measure import count_params
from ..train import BNSparsity
from .registry import Option

_LAYER_LIST = (list, tuple, type(None))
# Options every structured method takes (they shape the PruneGraph).
STRUCTURED_OPTIONS = (
    Option("ignored_layers", _LAYER_LIST, None, "module names (or modules) never pruned; the output layers never are"),
    Option("min_keep", int, 1, "channels every coupled group keeps at least", minimum=1),
    Option("round_to", (int, type(None)), None, "round kept channel counts up to a multiple of this (e.g. 8)",
           minimum=1),
)


# Sparsity training on BN scale factors (network slimming's L1 on γ), shared by the BN-|γ| methods.
DEFAULT_S = 2e-3
BN_SPARSITY_OPTIONS = (
    Option("s", (int, float), DEFAULT_S, "L1 strength on BN γ (sub-gradient s·sign(γ) added each step)", minimum=0),
    Option("decay", str, "constant", "how s falls over the stage", BNSparsity.DECAYS),
)


def prunable_bns(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: list | None = None) -> list[str]:
    """Names of the BNs of prunable coupled groups: the γ that decide what a BN-|γ| method removes."""
    from ..graph import PruneGraph

    x = example_inputs[:1].to(next(model.parameters()).device)
    return sorted({name for g in PruneGraph(model, x, ignored_layers=ignored_layers).groups for name in g.bns})


def bn_sparsity(model: nn.Module, settings: dict, total_steps: int, example_inputs: torch.Tensor,
                ignored_layers: list | None = None) -> BNSparsity:
    """The ``sparsify`` stage's regulariser for methods that rank channels by BN |γ|: only the BNs of prunable
    groups are penalised (shrinking a γ that can never be pruned only costs accuracy)."""
    return BNSparsity(s=settings["s"], decay=settings["decay"], total_steps=total_steps,
                      bns=prunable_bns(model, example_inputs, ignored_layers))


def cost(model: nn.Module, macs: int) -> dict[str, int]:
    """Params and MACs in the shape PruneResult records (MACs come from the graph's checked passes)."""
    return {"params": count_params(model), "macs": macs}
