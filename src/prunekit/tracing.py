"""Guards on Torch-Pruning's index rules, so a model they would misread is traced safely.

Where Torch-Pruning's rules would misread a node (a reshape that neither keeps (N, C) nor flattens
them: channel shuffles, channel-last window partitions; pixel shuffles, which it takes for
element-wise; any node on which a rule raises), the node is made opaque: the groups reaching it stay
whole. ``TraceLog`` records what a forward really reshaped and shuffled, for ``PruneGraph`` to hand
to the guarded rules installed here on import.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping


class TraceLog(TorchFunctionMode):
    """Records, by the autograd node each creates, every reshape's real (input, output) shapes and every
    pixel or channel shuffle (an op Torch-Pruning takes for element-wise, mapping channel i to channel i)."""

    RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
    SHUFFLES = {"pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}

    def __init__(self) -> None:
        super().__init__()
        self.reshapes: dict = {}
        self.shuffles: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            if name in self.RESHAPES:
                self.reshapes[out.grad_fn] = (tuple(args[0].shape), tuple(out.shape))
            elif name in self.SHUFFLES:
                self.shuffles.add(out.grad_fn)
        return out


def _reshape(graph, node) -> str | None:
    """How prunekit reads a reshape it recorded (None: not recorded, Torch-Pruning's rule decides).

    Torch-Pruning's reshape rule reads dim 1 as channels and guesses the rest recursively. It is needed
    for flattening (N, C, H, W) to (N, C·H·W) and back ("flatten"); a reshape that keeps (N, C) keeps every
    channel index ("kept", no rule needed: its guess only costs time and, on channel-last models, goes
    astray); anything else (a channel shuffle's view into groups, which crashes it, the window partitions
    of channel-last Swin and MaxViT, where it makes a bogus flatten whose index lists explode) is opaque.
    """
    shapes = graph.prunekit_reshapes.get(node.grad_fn)
    if shapes is None:
        return None
    before, after = shapes
    if len(before) < 2 or len(after) < 2 or before[0] != after[0]:
        return "opaque"
    if before[1] == after[1]:
        return "kept"
    if (len(after) == 2 and after[1] == math.prod(before[1:])) or (len(before) == 2 and before[1] == math.prod(
            after[1:])):
        return "flatten"
    return "opaque"


def _guarded(rule):
    """Torch-Pruning's index rule for one kind of node, made safe on graphs prunekit traced: a reshape it
    would misread, or a node on which the rule itself fails (Swin-S/B's concatenations), becomes opaque:
    groups reach it (and are then left whole) but no index passes it."""
    def run(graph, node) -> None:
        if not hasattr(graph, "prunekit_reshapes"):  # a graph built by someone else: the library's own rule
            rule(graph, node)
            return
        kind = _reshape(graph, node)
        if kind == "kept":
            return
        if kind != "opaque":
            try:
                with warnings.catch_warnings():  # its shape guesser gives up on deep graphs: no mapping, as before
                    warnings.filterwarnings("ignore", "Maximum recursive depth reached")
                    rule(graph, node)
                return
            except Exception:  # noqa: BLE001 - any failure of the rule leaves this node unmapped
                pass
        make_opaque(graph, node)
    return run


def make_opaque(graph, node) -> None:
    graph.prunekit_opaque.add(node)
    for dep in node.dependencies:
        dep.index_mapping[:] = [_stop, _stop]


def _stop(_idxs: list) -> list:
    return []


# Torch-Pruning re-runs its index rules for every group it builds, so the guards stay installed.
for _rule in ("reshape", "concat", "split", "slice", "unbind", "expand"):
    _name = f"update_{_rule}_index_mapping"
    setattr(index_mapping, _name, _guarded(getattr(index_mapping, _name)))
