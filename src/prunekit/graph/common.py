"""What the graph's parts share: the layer kinds and Torch-Pruning handlers groups are read by, a coupled
group, a forward that names the module that failed, and the tensors of a model output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch_pruning.pruner import function as F_

from ..errors import PrunekitError
from ..measure import LAYERS, hooked

CONV_LINEAR = LAYERS
# Torch-Pruning handlers that shrink a conv/linear layer's outputs or inputs (methods read group members by them).
OUT_CHANNEL_FNS = {F_.prune_conv_out_channels, F_.prune_linear_out_channels, F_.prune_depthwise_conv_out_channels}
IN_CHANNEL_FNS = {F_.prune_conv_in_channels, F_.prune_linear_in_channels, F_.prune_depthwise_conv_in_channels}


@dataclass
class Group:
    """One set of coupled channels; ``tp_group`` holds Torch-Pruning's full-index group."""

    index: int
    name: str
    size: int
    tp_group: object
    # (module name, 'out' | 'in' | 'dw' | 'mha', channels of this member per group channel)
    members: list[tuple[str, str, int]] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    # Grouped convs (ResNeXt, RegNet) split the channels into `chunks` equal blocks; the same positions
    # must go from every block, so keep counts are multiples of `chunks`.
    chunks: int = 1

    @property
    def root(self) -> nn.Module:
        return self.tp_group[0].dep.target.module


def run_checked(model: nn.Module, example_inputs: torch.Tensor, what: str) -> torch.Tensor:
    """Forward ``example_inputs``; on failure raise a PrunekitError naming the module that failed."""
    stack: list[str] = []
    done: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(m, _inp):  # the innermost running module, and the last one that finished
        stack.append(names.get(m, "?"))

    def post(m, _inp, _out):
        if stack:
            done[:] = [stack.pop()]

    mods = list(model.modules())
    try:
        with hooked(model, [(m, post) for m in mods], [(m, pre) for m in mods], grad=torch.is_grad_enabled()):
            return model(example_inputs)
    except Exception as exc:
        where = stack[-1] if stack and stack[-1] else type(model).__name__
        after = f" just after module {done[0]!r}" if done else ""
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("the input does not fit the model: check its shape (channels, size) against the model's input"
                if not done else "its forward likely has shape logic that tracing cannot follow (e.g. a hard-coded "
                "reshape): make it shape-agnostic or pass the layers feeding it in ignored_layers")
        raise PrunekitError(f"{what}: forward failed in module {where!r}{after} ({msg[:160]}); {hint}") from exc


def flat_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or tuples / lists / dicts of them, nested)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in flat_tensors(o)]
    return []
