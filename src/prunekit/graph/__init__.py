"""Structural surgery on top of Torch-Pruning's DependencyGraph.

``PruneGraph`` traces a model once and exposes its coupled channel groups (all layers whose
channels must be removed together: a conv, its BN, the next layers' inputs, every member of a
residual sum). It predicts the MACs of any per-group keep count analytically (conv/linear
MACs are out·in/groups·k²·H·W with H·W fixed by the trace), which lets thresholds search a
speedup target without pruning trial copies, then physically removes the chosen channels.
Everything else the model computes (attention products, functional layers) enters that model as
a constant measured by PyTorch's FLOP counter, so the prediction is the independent count's.

Attention: ``nn.MultiheadAttention`` prunes as Torch-Pruning does (its embedding width with the
stream around it, the same positions in every head so heads keep equal dimensions); the MACs
model has its projections (quadratic in the width) and its attention products (linear).
Attention written by hand, whose forward views channels as (heads, dims) with fixed sizes (a module
with a ``num_heads``/``n_heads`` attribute), keeps the widths its layers produce, and layers whose
weights are only used through functional calls keep every width they touch.

Where Torch-Pruning's index rules would misread a node (a reshape that neither keeps (N, C) nor
flattens them: channel shuffles, channel-last window partitions; pixel shuffles, which it takes for
element-wise; any node on which a rule raises), the node is opaque: the groups reaching it stay whole.

The class has three parts: ``groups`` (tracing and the coupled groups), ``cost`` (the analytic MACs of a
keep decision) and ``surgery`` (folds, masks, removal, module replacement); ``common`` holds what they share.

Beside it: ``tracing`` (the guards on Torch-Pruning's index rules), ``blocks`` (residual-block
discovery and removal), ``compensate`` (fold a constant into the next layer, merge one input channel
into another) and ``masks`` (unstructured sparsity kept through training).
"""

from __future__ import annotations

from .common import CONV_LINEAR, IN_CHANNEL_FNS, OUT_CHANNEL_FNS, Group, flat_tensors, run_checked
from .cost import _PRODUCTS as _PRODUCTS  # re-exported: latency tells attention products apart
from .groups import PruneGraph, output_layers
from .surgery import ROUTING_ATTRS, set_module, sync_widths

__all__ = ["CONV_LINEAR", "IN_CHANNEL_FNS", "OUT_CHANNEL_FNS", "ROUTING_ATTRS", "Group", "PruneGraph",
           "flat_tensors", "output_layers", "run_checked", "set_module", "sync_widths"]
