"""``PruneGraph``: trace a model once and read its coupled channel groups.

Tracing is Torch-Pruning's, under the guards of ``prunekit.tracing``; around it, forward passes find the
layers producing an output (never pruned), hand-written attention, and weights used only through functional
calls, whose groups stay whole. The MACs model (``cost``) and the removal (``surgery``) are the class's
other two parts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as F_

from ..errors import PrunekitError
from ..measure import LAYERS, count_macs, hooked
from ..tracing import TraceLog, make_opaque
from .common import CONV_LINEAR, IN_CHANNEL_FNS, OUT_CHANNEL_FNS, Group, flat_tensors, run_checked
from .cost import Costs
from .surgery import Surgery


def output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The conv/linear layers whose results reach a model output without passing through another one.

    Their output channels *are* output channels (a classifier, every head of a detector, every branch
    concatenated into an output), so pruning them would change an output's shape. Found by walking the
    autograd graph back from every output tensor to the nearest conv/linear node on each path.
    """
    produced: dict = {}

    def hook(m: nn.Module, _inp, out) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced[out.grad_fn] = m

    x = example_inputs[:1].detach().clone().requires_grad_(True)
    with hooked(model, [(m, hook) for m in model.modules() if isinstance(m, LAYERS)], grad=True):
        out = model(x)
    heads: dict[nn.Module, None] = {}
    seen: set = set()
    stack = [t.grad_fn for t in flat_tensors(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in produced:
            heads[produced[fn]] = None
        else:
            stack += [f for f, _ in fn.next_functions if f is not None]
    return list(heads)


class PruneGraph(Costs, Surgery):
    """Coupled channel groups of ``model`` and the analytic MACs of any keep decision."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, ignored_layers: list | None = None,
                 min_keep: int = 1, round_to: int | None = None, cost_model: Any = None):
        """``cost_model``: what a keep decision costs instead of analytic MACs (a latency target's table, whose
        ``macs(graph, widths)`` predicts latency in MACs of the unpruned model); None: MACs."""
        if min_keep < 1:
            raise PrunekitError(f"min_keep must be >= 1, got {min_keep}")
        if round_to is not None and round_to < 1:
            raise PrunekitError(f"round_to must be a positive integer, got {round_to}")
        self.model = model
        self.example_inputs = example_inputs
        self.min_keep = min_keep
        self.round_to = round_to
        self.cost_model = cost_model
        self.names = {m: n for n, m in model.named_modules()}
        self.ignored = [self._resolve(x) for x in (ignored_layers or [])]
        self.protected: dict[str, str] = {}  # layer name -> why its widths stay (beyond the output heads)
        unreached = self._probe()
        self.DG = tp.DependencyGraph()
        try:
            with hooked(model, grad=True), TraceLog() as log:  # Torch-Pruning traces the autograd graph
                self.DG.prunekit_reshapes, self.DG.prunekit_opaque = log.reshapes, set()
                self.DG.build_dependency(model, example_inputs=example_inputs, verbose=False)
        except Exception as exc:
            run_checked(model, example_inputs, "tracing")  # names the module if forward itself fails
            raise PrunekitError(f"Torch-Pruning could not trace this model: {str(exc).splitlines()[0][:200]}") from exc
        for node in self.DG.module2node.values():
            if node.grad_fn in log.shuffles:  # no index rule runs there: made opaque once, stays so
                make_opaque(self.DG, node)
        self._functional = self._functional_weights(unreached) | self.DG.prunekit_opaque
        self.groups = self._collect_groups()

    def _resolve(self, layer) -> nn.Module:
        if isinstance(layer, nn.Module):
            return layer
        try:
            return self.model.get_submodule(layer)
        except AttributeError as exc:
            raise PrunekitError(f"ignored layer {layer!r} is not a module of this model") from exc

    def _probe(self) -> list[nn.Module]:
        """Forward passes that learn what tracing needs besides the graph.

        They record per conv/linear the MACs per (out·in/groups) unit for the analytic MACs (and per
        ``nn.MultiheadAttention`` its projection and attention-product terms), the MACs outside these
        (``other``, a constant), and the layers producing any output (the heads, added to the ignored
        layers: those the model declares in ``prunekit_protected``, else ``output_layers``); hand-written
        attention keeps its widths. Returns the conv/linear layers that never ran as modules (ignored or not).
        """
        _, macs = self._layer_macs("tracing")
        self.unit = {n: m // max(1, self._units(self.model.get_submodule(n))) for n, m in macs.items()}
        order = [self.model.get_submodule(n) for n in macs]
        self._shapes = {name: self._shape(self.model.get_submodule(name)) for name in self.unit}
        ran_mha = self._attention_terms()
        self.other = 0  # macs() adds it: zero while it sums the modelled layers alone
        self.other = count_macs(self.model, self.example_inputs[:1]) - self.macs()
        self.base_macs = self.macs()
        declared = getattr(self.model, "prunekit_protected", None)  # a model that knows its heads (detectors)
        heads = ([self.model.get_submodule(n) for n in declared] if declared else
                 output_layers(self.model, self.example_inputs) or order[-1:])  # no autograd path: the last layer
        self.heads = [self.names[m] for m in heads]
        self.ignored += [m for m in heads if m not in self.ignored]
        if not declared:
            for m, why in _head_views(self.model).items():
                self.protected.setdefault(self.names[m], why)
                if m not in self.ignored:
                    self.ignored.append(m)
        inner = {a.out_proj for a in ran_mha}  # run inside the attention's functional forward
        return [m for m in self.model.modules() if isinstance(m, CONV_LINEAR) and m not in order and m not in inner]

    def _functional_weights(self, unreached: list[nn.Module]) -> set:
        """The traced operations that use the weights of conv/linear layers that never ran as modules
        (functional calls such as ``F.linear(x, layer.weight)``, which Torch-Pruning takes for element-wise
        operations): every group through them stays whole.

        A layer whose weights nothing uses is refused unless ignored: it never ran, and pruning around it
        could break it.
        """
        weights = {id(m.weight): m for m in unreached}
        ops, used = set(), set()
        for node in self.DG.module2node.values():
            hit = _weights_used(node.grad_fn, weights)
            if hit:
                ops.add(node)
                used |= hit
        never = [self.names[m] for m in unreached if m not in used and m not in self.ignored]
        if never:
            raise PrunekitError(
                f"layer(s) {', '.join(repr(n) for n in never[:5])} never ran on the example input "
                "(data-dependent control flow); pruning them could break the model: pass them in ignored_layers "
                "or call them as modules in a static forward")
        for m in used:
            self.protected[self.names[m]] = "weights used through a functional call"
        return ops

    def _collect_groups(self) -> list[Group]:
        groups: list[Group] = []
        # Groups left whole: grouped-conv groups too small to shrink block-wise, groups touching functional weights.
        self.ignored_groups: list[str] = []
        for g in self.DG.get_all_groups(ignored_layers=self.ignored, root_module_types=CONV_LINEAR):
            root_dep, root_idxs = g[0]
            n = len(root_idxs)
            members, bns, chunks = [], [], 1
            if any(dep.target in self._functional for dep, _ in g):  # functional weights, unmapped reshapes
                self.ignored_groups.append(self.names.get(root_dep.target.module, "?"))
                continue
            for dep, idxs in g:
                mod = dep.target.module
                if not isinstance(mod, nn.Module):
                    continue
                pruner = self.DG.get_pruner_of_module(mod)
                if pruner is not None and not (isinstance(mod, nn.Conv2d) and mod.groups == mod.out_channels):
                    out_fn = self.DG.is_out_channel_pruning_fn(dep.handler)
                    get = getattr(pruner, "get_out_channel_groups" if out_fn else "get_in_channel_groups", None)
                    chunks = max(chunks, int(get(mod) or 1) if get else 1)
                name = self.names.get(mod, "?")
                per = max(1, len(idxs) // n)
                if isinstance(mod, nn.MultiheadAttention):  # same positions from every head: equal head dims
                    chunks = math.lcm(chunks, mod.num_heads)
                    if (name, "mha", per) not in members:
                        members.append((name, "mha", per))
                elif dep.handler is F_.prune_depthwise_conv_out_channels:
                    members.append((name, "dw", per))
                elif dep.handler in OUT_CHANNEL_FNS:
                    members.append((name, "out", per))
                elif dep.handler in IN_CHANNEL_FNS:
                    members.append((name, "in", per))
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    bns.append(name)
            if n <= self.min_keep:
                continue
            if n % chunks or n // chunks <= 1:
                self.ignored_groups.append(self.names.get(root_dep.target.module, "?"))
                continue
            groups.append(Group(len(groups), self.names.get(root_dep.target.module, "?"), n, g, members, bns, chunks))
        return groups


def _head_views(model: nn.Module) -> dict[nn.Module, str]:
    """Conv/linear layers of hand-written attention: the innermost modules with an integer ``num_heads`` or
    ``n_heads`` (not ``nn.MultiheadAttention``, which Torch-Pruning handles) view their channels as (heads,
    dims) with fixed sizes, so the widths these layers produce must stay."""
    def heads(m: nn.Module) -> bool:
        counts = [getattr(m, a, None) for a in ("num_heads", "n_heads")]
        return not isinstance(m, nn.MultiheadAttention) and any(type(c) is int for c in counts)

    found: dict[nn.Module, str] = {}
    for m in model.modules():
        if heads(m) and not any(heads(c) or isinstance(c, nn.MultiheadAttention) for c in m.modules() if c is not m):
            found |= {c: f"in {type(m).__name__}, whose forward splits channels into heads"
                      for c in m.modules() if isinstance(c, CONV_LINEAR)}
    return found


def _weights_used(fn, weights: dict[int, nn.Module], depth: int = 2) -> set[nn.Module]:
    """Layers among ``weights`` (by id of their weight) whose weight feeds autograd node ``fn`` directly or
    through a transpose/view of it."""
    found: set[nn.Module] = set()
    for f, _ in getattr(fn, "next_functions", ()) or ():
        if f is None:
            continue
        var = getattr(f, "variable", None)
        if var is not None and id(var) in weights:
            found.add(weights[id(var)])
        elif depth > 1 and f.name().startswith(("TBackward", "TransposeBackward", "PermuteBackward", "ViewBackward")):
            found |= _weights_used(f, weights, depth - 1)
    return found
