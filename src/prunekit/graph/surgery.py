"""Physical removal and what goes with it: masking channels, folding a constant into the next layer,
replacing a submodule, and the integer widths a forward reads instead of a layer's shape."""

from __future__ import annotations

import torch
from torch import nn

from ..compensate import fold_constant_into
from ..errors import PrunekitError
from ..measure import count_macs
from .common import OUT_CHANNEL_FNS, run_checked

_ADDS_BIAS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}  # forwards that add self.bias
_BN = nn.modules.batchnorm._BatchNorm


class Surgery:
    """``PruneGraph``'s changes to the model: exact folds, masks, and the removal of chosen channels."""

    @torch.no_grad()
    def fold_constant(self, consumer: nn.Module, idx: list[int], values: torch.Tensor) -> bool:
        """Fold constant inputs ``values`` on channels ``idx`` of ``consumer`` somewhere exact; False if nowhere.

        Into its bias, else the BN right after it (running mean), else a new bias; a branch whose forward
        ignores a bias (e.g. the option-A shortcut) feeding x + BN(y) shifts that BN's β instead.
        """
        node = self.DG.module2node[consumer]
        nxt = node.outputs[0] if len(node.outputs) == 1 else None
        bn_after = nxt.module if nxt is not None and isinstance(nxt.module, _BN) and len(nxt.inputs) == 1 else None
        if type(consumer).forward in _ADDS_BIAS or (consumer.bias is None and bn_after is not None):
            fold_constant_into(consumer, idx, values, bn=bn_after)
            return True
        if nxt is not None and nxt.grad_fn is not None and nxt.grad_fn.name().startswith("AddBackward") \
                and len(nxt.inputs) == 2:
            other = next(n for n in nxt.inputs if n is not node)
            if isinstance(other.module, _BN) and other.module.bias is not None and len(other.outputs) == 1:
                w = consumer.weight
                other.module.bias += (w[:, idx].flatten(2).sum(-1) if w.dim() > 2 else w[:, idx]) @ values.to(w.dtype)
                return True
        return False

    def can_fold(self, consumer: nn.Module) -> bool:
        """Whether a constant on ``consumer``'s input can be folded somewhere exact (folding nothing tells)."""
        return type(consumer).forward in _ADDS_BIAS or self.fold_constant(consumer, [], torch.zeros(0))

    def member_indices(self, gi: int, idxs: list[int]) -> list[tuple[nn.Module, object, list[int]]]:
        """(module, Torch-Pruning handler, that module's indices) for channels ``idxs`` of group ``gi``."""
        g = self.groups[gi]
        root_dep = g.tp_group[0].dep
        sub = self.DG.get_pruning_group(root_dep.target.module, root_dep.handler, list(idxs))
        return [(dep.target.module, dep.handler, list(i)) for dep, i in sub]

    @torch.no_grad()
    def zero_channels(self, remove: dict[int, list[int]]) -> None:
        """Mask (not remove) channels: zero every producer's weights and BN γ, β for them.

        The masked model computes exactly what the pruned one will, which is what the surgery
        tests compare against.
        """
        for gi, idxs in remove.items():
            for mod, handler, i in self.member_indices(gi, idxs):
                if handler in OUT_CHANNEL_FNS or isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.weight[i] = 0
                    if getattr(mod, "bias", None) is not None:
                        mod.bias[i] = 0

    def apply(self, remove: dict[int, list[int]]) -> int:
        """Physically remove channels ``remove[group index]`` (indices into that group's channels).

        Returns the pruned model's MACs as counted (``measure.count_macs``) on the forward pass that
        checks it still runs. A frozen parameter stays frozen: Torch-Pruning replaces every pruned
        Parameter by a new one that requires grad, which would change what an optimiser (and the
        checkpoint of an interrupted fine-tune, resumed from the saved model) sees as trainable.
        """
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        for gi, idxs in remove.items():
            idxs = sorted(set(int(i) for i in idxs))
            if not idxs:
                continue
            g = self.groups[gi]
            if g.size - len(idxs) < self.min_keep:
                raise PrunekitError(f"group {g.name}: removing {len(idxs)} of {g.size} channels breaks min_keep")
            if g.chunks > 1:
                per = g.size // g.chunks
                pos = {i % per for i in idxs}
                if len(idxs) != len(pos) * g.chunks or len(pos) >= per:
                    raise PrunekitError(f"group {g.name} feeds a grouped conv ({g.chunks} groups): remove the same "
                                        "positions from every channel block and keep at least one per block")
            g.tp_group.prune(idxs=idxs)
        for name, p in self.model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        sync_widths(self.model)
        return count_macs(self.model, self.example_inputs[:1], run=lambda m, x: run_checked(m, x, "after pruning"))


def sync_widths(model: nn.Module) -> None:
    """Reset plain integer widths that a forward reads instead of a layer's shape (torchvision ViT's
    ``hidden_dim``, used to reshape the patch embedding); ``io`` records them for loading."""
    from torchvision.models.vision_transformer import VisionTransformer

    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.hidden_dim = m.conv_proj.out_channels


ROUTING_ATTRS = ("f", "i", "type")  # how Ultralytics' DetectionModel.forward finds each layer's inputs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (pruned-away blocks, rewritten modules).

    The replacement keeps the routing attributes a container reads from its layers (``ROUTING_ATTRS``),
    so a residual layer of a YOLO backbone can become an identity and still be fed the right input.
    """
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf, None)
    for attr in ROUTING_ATTRS:
        if hasattr(old, attr) and not hasattr(new, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(owner, leaf, new)
