"""The analytic cost of a keep decision: conv/linear MACs are out·in/groups·k²·H·W with H·W fixed by the trace,
``nn.MultiheadAttention`` adds its projections and attention products, and everything else is a constant
(``other``) measured by PyTorch's FLOP counter. A graph built with a ``cost_model`` (a latency target's table)
prices a decision in predicted latency instead."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ..measure import count_macs, hooked, layer_macs
from .common import Group, run_checked

_PRODUCTS = "#attention"  # suffix of an MHA's attention-product term in the MACs model


class Costs:
    """``PruneGraph``'s MACs model: per traced layer its shape and MACs per (out·in/groups) unit."""

    def _attention_terms(self) -> list[nn.MultiheadAttention]:
        """Add every ``nn.MultiheadAttention`` that runs to the MACs model; returns them.

        With width E and the query, key and value token counts, its projections cost (2·q + k + v)·E²
        (its ``[E, E]`` term) and the rest (the attention products, where PyTorch's counter sees them) is
        linear in E (its ``[E]`` term), measured by that counter on the call the model makes.
        """
        calls: dict[nn.Module, tuple] = {}
        attns = [m for m in self.model.modules() if isinstance(m, nn.MultiheadAttention)]
        if not attns:
            return []
        handles = [m.register_forward_pre_hook(lambda m, a, kw: calls.setdefault(m, (a, kw)) and None,
                                               with_kwargs=True) for m in attns]
        try:
            with hooked(self.model):
                self.model(self.example_inputs[:1])
        finally:
            for h in handles:
                h.remove()
        for m, (args, kwargs) in calls.items():
            name = self.names[m]
            if not m._qkv_same_embed_dim:  # Torch-Pruning shrinks only attention whose key/value width is E
                self.protected[name] = "attention with key/value widths other than its embed_dim"
                self.ignored.append(m)
                continue
            bound = inspect.signature(m.forward).bind(*args, **kwargs).arguments
            e = m.embed_dim
            tokens = [bound[k].numel() // e for k in ("query", "key", "value")]
            total = count_macs(m, (args, kwargs), run=lambda mod, a: mod(*a[0], **a[1]))
            self.unit[name] = 2 * tokens[0] + tokens[1] + tokens[2]
            self._shapes[name] = [e, e, 1]
            self.unit[name + _PRODUCTS] = max(0, total - self.unit[name] * e * e) // e
            self._shapes[name + _PRODUCTS] = [e, 1, 1]
        return list(calls)

    def clamp_keep(self, group: Group, keep: int) -> int:
        """Apply ``min_keep`` and ``round_to`` to a wanted keep count."""
        keep = max(self.min_keep, min(group.size, keep))
        step = group.chunks * (self.round_to or 1)  # grouped convs: whole positions across every block
        return min(group.size, int(math.ceil(keep / step) * step))

    def _layer_macs(self, what: str) -> tuple[torch.Tensor, dict[str, int]]:
        """Per-layer MACs of one image, from a forward that names the failing module if it breaks."""
        return layer_macs(self.model, self.example_inputs[:1], run=lambda m, x: run_checked(m, x, what))

    @staticmethod
    def _units(m: nn.Module) -> int:
        o, i, g = Costs._shape(m)
        return o * (i // max(g, 1))

    @staticmethod
    def _shape(m: nn.Module) -> list[int]:
        if isinstance(m, nn.Linear):
            return [m.out_features, m.in_features, 1]
        return [m.out_channels, m.in_channels, m.groups]

    def macs(self, keep: dict[int, int] | None = None) -> int:
        """MACs of the model if group i kept ``keep[i]`` channels (others untouched).

        With a cost model (``cost_model``: a latency target's table) a keep decision costs what the model
        predicts instead, so every budget a method computes from MACs becomes that budget unchanged.
        """
        shape = self.widths(keep)
        if keep is not None and self.cost_model is not None:
            return self.cost_model.macs(self, shape)
        return self.other + int(sum(self.unit[n] * o * (i // max(gr, 1)) for n, (o, i, gr) in shape.items()))

    def widths(self, keep: dict[int, int] | None = None) -> dict[str, list[int]]:
        """Per modelled layer [out, in, groups] if group i kept ``keep[i]`` channels (others untouched)."""
        shape = {name: list(s) for name, s in self._shapes.items()}
        for gi, k in (keep or {}).items():
            g = self.groups[gi]
            removed = g.size - k
            for name, kind, per in g.members:
                if name not in shape:
                    continue
                s = shape[name]
                if kind == "out":
                    s[0] -= removed * per
                elif kind == "in":
                    s[1] -= removed * per
                elif kind == "mha":  # embed_dim: projections shrink on both sides, attention products once
                    s[0] -= removed * per
                    s[1] -= removed * per
                    shape[name + _PRODUCTS][0] -= removed * per
                else:  # depthwise: out, in and groups shrink together
                    s[0] -= removed * per
                    s[1] -= removed * per
                    s[2] -= removed * per
        return shape
