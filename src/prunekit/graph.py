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

Beside it: ``tracing`` (the guards on Torch-Pruning's index rules), ``blocks`` (residual-block
discovery and removal), ``compensate`` (fold a constant into the next layer, merge one input channel
into another) and ``masks`` (unstructured sparsity kept through training).
"""

from __future__ import annotations

import inspect
import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as F_

from .compensate import fold_constant_into
from .errors import PrunekitError
from .measure import LAYERS, count_macs, hooked, layer_macs
from .tracing import TraceLog, make_opaque

CONV_LINEAR = LAYERS
# Torch-Pruning handlers that shrink a conv/linear layer's outputs or inputs (methods read group members by them).
OUT_CHANNEL_FNS = {F_.prune_conv_out_channels, F_.prune_linear_out_channels, F_.prune_depthwise_conv_out_channels}
IN_CHANNEL_FNS = {F_.prune_conv_in_channels, F_.prune_linear_in_channels, F_.prune_depthwise_conv_in_channels}
_ADDS_BIAS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}  # forwards that add self.bias
_BN = nn.modules.batchnorm._BatchNorm
_PRODUCTS = "#attention"  # suffix of an MHA's attention-product term in the MACs model
# The currency budgets are counted in: None for analytic MACs; while a latency target is pruned to,
# prunekit.latency sets a table whose ``macs(graph, widths)`` predicts latency in MACs of the unpruned model.
COST_MODEL: ContextVar = ContextVar("prunekit_cost_model", default=None)


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


class PruneGraph:
    """Coupled channel groups of ``model`` and the analytic MACs of any keep decision."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, ignored_layers: list | None = None,
                 min_keep: int = 1, round_to: int | None = None):
        if min_keep < 1:
            raise PrunekitError(f"min_keep must be >= 1, got {min_keep}")
        if round_to is not None and round_to < 1:
            raise PrunekitError(f"round_to must be a positive integer, got {round_to}")
        self.model = model
        self.example_inputs = example_inputs
        self.min_keep = min_keep
        self.round_to = round_to
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

    # ---- decisions and their cost ----
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
        o, i, g = PruneGraph._shape(m)
        return o * (i // max(g, 1))

    @staticmethod
    def _shape(m: nn.Module) -> list[int]:
        if isinstance(m, nn.Linear):
            return [m.out_features, m.in_features, 1]
        return [m.out_channels, m.in_channels, m.groups]

    def macs(self, keep: dict[int, int] | None = None) -> int:
        """MACs of the model if group i kept ``keep[i]`` channels (others untouched).

        While a cost model is set (``COST_MODEL``: a latency target) a keep decision costs what the model
        predicts instead, so every budget a method computes from MACs becomes that budget unchanged.
        """
        shape = self.widths(keep)
        cost_model = COST_MODEL.get()
        if keep is not None and cost_model is not None:
            return cost_model.macs(self, shape)
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
