"""Pruning methods by name: the registry behind ``prunekit.prune`` and ``prunekit methods``.

Each method is a module in this package that reads like its paper and registers itself with
``register``, declaring everything the layers above need to know about it: its kind and target,
its options (type, default, one line of help), whether it needs data, the sparsity regulariser its
training stages use, whether zeros must stay zero through training, and the figures it adds to a
report. The pipeline, CLI and report read only these declarations, so adding a method touches its
own module and nothing else.

A method is called as ``fn(model, ctx, speedup=… | sparsity=…, **options)`` with the options
checked and their defaults filled in, and returns a ``PruneResult``. ``ctx`` (a ``Context``) holds
what the method may use besides the model: example inputs drawn from the real data, calibration
batches from the training split, a held-out validation split of the training data (never the test
split), the task's ``evaluate`` and the device.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import latency as lat
from .. import tasks
from ..errors import PrunekitError
from ..graph import flat_tensors, run_checked
from ..measure import count_macs, count_params, hooked
from ..targets import latency as latency_target
from ..tasks import Task
from ..thresholds import TOLERANCE
from ..train import BNSparsity, adapt_bn


@dataclass
class PruneResult:
    """What a pruning call did: the pruned model, its cost before/after, and what was removed."""

    model: nn.Module
    method: str
    target: dict[str, Any]
    before: dict[str, int]
    after: dict[str, int]
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    blocks_removed: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] | None = None  # a latency target: the measured speedup, its spread and runtime

    @property
    def speedup(self) -> float:
        """Achieved theoretical MACs ratio base/pruned."""
        return self.before["macs"] / max(self.after["macs"], 1)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "before": self.before, "after": self.after,
                "speedup": self.speedup, "channels": {k: list(v) for k, v in self.channels.items()},
                "blocks_removed": self.blocks_removed, "info": self.info} | \
            ({"measured": self.measured} if self.measured is not None else {})

    def summary(self) -> str:
        b, a = self.before, self.after
        line = (f"{self.method}: MACs {b['macs'] / 1e6:.2f}M -> {a['macs'] / 1e6:.2f}M ({self.speedup:.2f}x), "
                f"params {b['params'] / 1e6:.3f}M -> {a['params'] / 1e6:.3f}M")
        if self.measured:
            t = self.measured
            line += (f", measured {t['speedup']:.2f}x ({t['lo']:.2f}-{t['hi']:.2f}) faster on {t['runtime']} "
                     f"(batch {t['batch']}, {t['threads']} threads)")
        return line


# ---- declared options ----
@dataclass(frozen=True)
class Option:
    """One option of a method: name, accepted type(s), default, one line of help, allowed values or range.

    The range is declared here, not checked inside the method, so a config is refused before any stage runs.
    """

    name: str
    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    implies: dict[str, Any] | None = None  # other options this one sets when given (q -> rule=layer-std)

    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " or ".join("null" if t is type(None) else t.__name__ for t in types)

    def check(self, value: Any, method: str) -> Any:
        """The value, or a PrunekitError naming the option, its type and the allowed values."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise PrunekitError(f"method {method!r}: option {self.name} must be {self.type_name()}, got {value!r}")
        ranged = self.minimum is not None or self.maximum is not None
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if self.choices is not None and value not in self.choices and not (numeric and ranged):
            raise PrunekitError(f"method {method!r}: option {self.name}={value!r} is not one of "
                                f"{', '.join(map(str, self.choices))}")
        if numeric and (
                (self.minimum is not None and value < self.minimum) or
                (self.maximum is not None and value > self.maximum)):
            lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
            hi = "inf" if self.maximum is None else f"{self.maximum:g}"
            raise PrunekitError(f"method {method!r}: option {self.name}={value!r} is outside [{lo}, {hi}]")
        return value


_LAYER_LIST = (list, tuple, type(None))
# Options every structured method takes (they shape the PruneGraph).
STRUCTURED_OPTIONS = (
    Option("ignored_layers", _LAYER_LIST, None, "module names (or modules) never pruned; the output layers never are"),
    Option("min_keep", int, 1, "channels every coupled group keeps at least", minimum=1),
    Option("round_to", (int, type(None)), None, "round kept channel counts up to a multiple of this (e.g. 8)",
           minimum=1),
)

# Every channel-removing method takes it; prune() applies it after the cut, so no method implements it.
BN_RECALIBRATE = Option("bn_recalibrate", int, 0, "re-estimate BN statistics on this many calibration batches of "
                        "the training split after the cut (0: off); no gradient step", minimum=0)


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


# ---- what a method receives ----
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Context:
    """Everything a method may use besides the model and its options.

    ``data`` yields ``(inputs, targets)`` batches of the training split (calibration, statistics);
    ``val`` is a held-out split of the *training* data for scoring decisions; ``evaluate(model, batches)``
    returns the task's metrics (``task.metric`` among them, e.g. ``top1``). Any of them may be missing
    for methods that need no data; ``require`` turns that into one clear error.
    """

    example_inputs: torch.Tensor
    data: Batches | None = None
    val: Batches | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    task: Task = field(default_factory=lambda: tasks.get(tasks.DEFAULT))

    def evaluate(self, model: nn.Module, batches: Batches | None = None) -> dict[str, float]:
        """The task's metrics of ``model`` on ``batches`` (default: the validation split)."""
        batches = batches if batches is not None else self.require("val", "evaluation")
        return self.task.evaluate(model, batches, self.device)

    def require(self, what: str, method: str) -> Batches:
        """``data`` or ``val``, or a PrunekitError saying what the method needs and how to give it."""
        value = getattr(self, what)
        if value is None:
            need = "calibration batches from the training data" if what == "data" else \
                "a held-out validation split of the training data"
            raise PrunekitError(f"method {method!r} needs {need}: pass {what}=<a DataLoader or a list of "
                                "(inputs, targets) batches> to prunekit.prune, --data to the CLI, or use a pipeline")
        return value

    def batches(self, n: int, source: str = "data", method: str = "this method") -> list[tuple[torch.Tensor, ...]]:
        """The first ``n`` batches of ``source`` on the context's device.

        Call it once and keep the list as the fixed calibration set: a shuffling loader yields other
        batches on its next pass (the pipeline passes a loader fixed to one order).
        """
        taken = list(itertools.islice(iter(self.require(source, method)), n))
        if not taken:
            raise PrunekitError(f"method {method!r}: the {source} batches are empty")
        return [tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in b) for b in taken]


# ---- the registry ----
@dataclass
class Method:
    """A registered method and what it declares (see the module docstring)."""

    name: str
    summary: str
    kind: str  # "structured" (speedup target), "unstructured" (sparsity), "adaptive" (learned threshold)
    fn: Callable[..., PruneResult]
    options: dict[str, Option]
    needs_data: bool = False
    # regularizer(model, settings, total_steps, example_inputs, ignored_layers) -> fit's after_backward hook,
    # for `sparsify` stages
    regularizer: Callable[..., Callable[[nn.Module], None]] | None = None
    regularizer_options: dict[str, Option] = field(default_factory=dict)
    keeps_zeros: bool = False  # unstructured: training after pruning keeps pruned weights at zero
    figures: Callable[[dict], list[tuple[str, bytes]]] | None = None  # PruneResult.info -> report PNGs
    needs_batchnorm: bool = False  # ranks channels by BN scale factors
    # options -> the options that set the cut themselves (e.g. "percentile"), so no target is needed; None if
    # they do not. A structured method's own cut excludes a speedup or latency target; an unstructured one's
    # may be calibrated by a sparsity target.
    own_cut: Callable[[dict], str | None] = lambda opts: None

    def check_target(self, opts: dict, targets: set[str]) -> None:
        """One PrunekitError if ``targets`` (the target keys given) is not what this method with ``opts`` takes."""
        cut = self.own_cut(opts)
        if self.kind == "structured" and not targets & {"speedup", "latency"} and cut is None:
            raise PrunekitError(f"method {self.name!r} needs a speedup target (e.g. speedup=2.0)")
        if self.kind == "structured" and cut is not None and targets & {"speedup", "latency"}:
            given = sorted(targets & {"speedup", "latency"})[0]
            raise PrunekitError(f"{cut} and {given} both set the cut of method {self.name!r}: give one of them")
        if self.kind == "unstructured" and not targets & {"sparsity", "schedule"} and cut is None:
            raise PrunekitError(f"method {self.name!r} needs a sparsity target (e.g. sparsity=0.9)")

    @property
    def target(self) -> str:
        return {"structured": "speedup", "unstructured": "sparsity", "adaptive": "learned (speedup caps)"}[self.kind]

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; one clear error for an unknown or ill-typed one."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise PrunekitError(f"method {self.name!r} has no option {', '.join(unknown)}; valid options: "
                                f"{', '.join(self.options) or 'none'} (see `prunekit methods`)")
        implied = {k: v for name in options for k, v in (self.options[name].implies or {}).items() if k not in options}
        options = {**implied, **options}
        return {k: o.check(options[k], self.name) if k in options else o.default for k, o in self.options.items()}

    def check_regularizer_options(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The regulariser's settings (defaults filled in) from a stage's keys; other keys are not its business."""
        if self.regularizer is None:
            raise PrunekitError(f"method {self.name!r} has no sparsity regulariser, so a sparsify stage means "
                                "nothing for it; use train or finetune")
        return {k: o.check(settings[k], self.name) if k in settings else o.default
                for k, o in self.regularizer_options.items()}


REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, kind: str = "structured", *, options: Iterable[Option] = (),
             needs_data: bool = False, regularizer: Callable | None = None,
             regularizer_options: Iterable[Option] = (), keeps_zeros: bool = False,
             figures: Callable | None = None, needs_batchnorm: bool = False,
             own_cut: Callable[[dict], str | None] | None = None) -> Callable:
    """Decorator: make ``fn(model, ctx, **options) -> PruneResult`` available by ``name``."""

    options = (*options, BN_RECALIBRATE) if kind != "unstructured" else tuple(options)

    def deco(fn: Callable[..., PruneResult]) -> Callable[..., PruneResult]:
        REGISTRY[name] = Method(name, summary, kind, fn, {o.name: o for o in options}, needs_data, regularizer,
                                {o.name: o for o in regularizer_options}, keeps_zeros, figures, needs_batchnorm,
                                *([own_cut] if own_cut is not None else []))
        return fn

    return deco


def _load_all() -> None:
    """Import every module of this package: each registers its methods (no list to keep in step)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[Method]:
    """All registered methods, in registration order."""
    _load_all()
    return list(REGISTRY.values())


def get(name: str) -> Method:
    _load_all()
    if name not in REGISTRY:
        raise PrunekitError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)} (see `prunekit methods`)")
    return REGISTRY[name]


def cost(model: nn.Module, macs: int) -> dict[str, int]:
    """Params and MACs in the shape PruneResult records (MACs come from the graph's checked passes)."""
    return {"params": count_params(model), "macs": macs}


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PrunekitError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_batches(data: Any) -> Batches | None:
    """A DataLoader, a prunekit Loader or any re-iterable of (inputs, targets) batches; one batch alone is wrapped."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        raise PrunekitError("data must be (inputs, targets) batches, e.g. a DataLoader or [(x, y), ...], "
                            "not a bare tensor")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [data]
    if not hasattr(data, "__iter__"):
        raise PrunekitError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}")
    if iter(data) is data:  # a one-shot iterator: keep what it yields so every pass sees the same batches
        data = list(data)
    return data


def prune(model: nn.Module, method: str, example_inputs: torch.Tensor | None = None, *,
          speedup: float | None = None, sparsity: float | None = None, latency: float | None = None,
          runtime: str = "eager", batch: int = 64, threads: int = 2, data: Any = None, val: Any = None,
          ctx: Context | None = None, **options: Any) -> PruneResult:
    """Prune ``model`` in place with ``method``; see ``prunekit methods`` for names, targets and options.

    ``data`` (calibration batches of the training split) and ``val`` (a held-out split of it) are needed
    only by data-driven methods; ``example_inputs`` default to the first batch of ``data``. A pipeline
    passes a ready ``ctx`` instead. ``latency`` replaces ``speedup`` when what matters is speed: the
    pruned model runs that many times faster, measured on ``runtime`` (a row of ``runtimes.RUNTIMES``:
    eager, onnxruntime, onnxruntime-int8) at ``batch`` with ``threads`` threads on this machine, within 5 %
    (``prunekit.latency``).
    """
    m = get(method)
    opts = m.check_options(options)
    speedup, sparsity = _number("speedup", speedup), _number("sparsity", sparsity)
    latency = _number("latency", latency)
    if latency is not None:
        _check_latency(m, opts, latency, speedup, runtime, batch, threads)
    m.check_target(opts, {k for k, v in (("speedup", speedup), ("sparsity", sparsity), ("latency", latency))
                          if v is not None})
    if speedup is not None and m.kind == "unstructured":
        raise PrunekitError(f"method {method!r} is unstructured: give sparsity, not speedup")
    if sparsity is not None and m.kind != "unstructured":
        raise PrunekitError(f"method {method!r} removes channels: give speedup, not sparsity")
    if speedup is not None and speedup < 1.0:
        raise PrunekitError(f"speedup must be >= 1.0 (base MACs / pruned MACs), got {speedup:g}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {sparsity:g}")
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    if not params:
        raise PrunekitError("model must be an nn.Module with parameters")
    if any(p.is_meta for p in params) or (isinstance(example_inputs, torch.Tensor) and example_inputs.is_meta):
        raise PrunekitError("the model or its example inputs are on the meta device (no values): load real weights "
                            "first, e.g. model.to_empty(device='cpu') then load a state dict")
    broken = next((n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()),
                  None)
    if broken is not None:
        raise PrunekitError(f"parameter {broken} holds NaN or infinite values: the model is broken (training "
                            "diverged?); prune a healthy checkpoint")
    dev = params[0].device
    if ctx is None:
        data, val = _as_batches(data), _as_batches(val)
        if example_inputs is None and data is not None:
            example_inputs = next(iter(data))[0]
        ctx = Context(example_inputs, data, val, dev, tasks.for_model(model))  # a detector scores by mAP
    if isinstance(ctx.example_inputs, tuple | list) and ctx.example_inputs:
        return _several_inputs(model, ctx, method, speedup=speedup, sparsity=sparsity, latency=latency,
                               runtime=runtime, batch=batch, threads=threads, **options)
    if not isinstance(ctx.example_inputs, torch.Tensor):
        raise PrunekitError("example_inputs must be a tensor batch shaped like the model's input, or a tuple of "
                            "them for a model of several inputs (or pass data= and the first batch is used)")
    ctx.example_inputs = ctx.example_inputs.to(dev)
    ctx.device = dev
    if m.needs_data:
        ctx.require("data", method)
    if m.needs_batchnorm and not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules()):
        raise PrunekitError(f"method {method!r} ranks channels by BatchNorm scale factors, but this model has no "
                            "BatchNorm layer; use a norm-based method such as l1-norm or dist-fit")
    target = {"sparsity": sparsity} if m.kind == "unstructured" else {"speedup": speedup}
    if latency is not None:
        target = {"latency": latency, "runtime": runtime, "batch": batch, "threads": threads}
    return _all_or_nothing(model, ctx, m, target, opts)


def _check_latency(m: Method, opts: dict, latency: float, speedup: float | None, runtime: Any, batch: Any,
                   threads: Any) -> None:
    """One PrunekitError for a latency target that cannot be pruned to, before anything runs."""
    if speedup is not None:
        raise PrunekitError("give latency (a measured speedup) or speedup (a MACs ratio), not both")
    if m.kind != "structured":
        raise PrunekitError(f"method {m.name!r} is {m.kind}: a latency target needs a method that removes channels "
                            "to a target (see `prunekit methods`)")
    if not math.isfinite(latency) or latency <= 1.0:
        raise PrunekitError(f"latency must be a finite number > 1 (base time / pruned time, measured), got "
                            f"{latency:g}")
    lat.check_setting(runtime, batch, threads)


def _all_or_nothing(model: nn.Module, ctx: Context, m: Method, target: dict, opts: dict) -> PruneResult:
    """Run the method; keep its result only if every output keeps its shape and (for a speedup target) an
    independent MACs count confirms the speedup within 3 % (for a latency target: the measured speedup lands
    within 5 %). Otherwise restore the model exactly and raise."""
    backup = copy.deepcopy(model)
    outputs = getattr(model, "prunekit_outputs", flat_tensors)  # a model may say which outputs are its results
    with torch.no_grad():
        shapes = [t.shape for t in outputs(run_checked(model, ctx.example_inputs[:1],
                                                       "running the model on the example input"))]
    opts = dict(opts)
    recalibrate = opts.pop(BN_RECALIBRATE.name, 0)
    calib = ctx.batches(recalibrate, "data", m.name) if recalibrate else None  # checked before the cut
    try:
        if "latency" in target:
            result = latency_target.search(model, backup, ctx, m, target, opts, shapes, _checked)
        else:
            result = _checked(model, backup, ctx, m, target, opts, shapes)
        if calib is not None:
            adapt_bn(result.model, calib)
            result.info["bn_recalibrated"] = len(calib)
        return result
    except BaseException:
        model.__dict__.update(backup.__dict__)  # the caller's model is exactly as it was
        raise


def _checked(model: nn.Module, backup: nn.Module, ctx: Context, m: Method, target: dict, opts: dict,
             shapes: list[torch.Size]) -> PruneResult:
    """The method's result on ``model``, or a PrunekitError if an output changed shape or the MACs missed."""
    x = ctx.example_inputs[:1]
    outputs = getattr(model, "prunekit_outputs", flat_tensors)
    try:
        result = m.fn(model, ctx, **target, **opts)
    except PrunekitError:
        raise
    except Exception as exc:  # a failure inside tracing or surgery: name it, never half-prune
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"method {m.name!r} failed on this model ({type(exc).__name__}: {msg})") from exc
    with hooked(result.model):
        after = [t.shape for t in outputs(result.model(x))]
    if after != shapes:
        raise PrunekitError(f"method {m.name!r} changed the model's output shapes ({_shapes(shapes)} -> "
                            f"{_shapes(after)}); pass the layers producing them in ignored_layers")
    if m.kind == "structured" and target.get("speedup") and m.own_cut(opts) is None and lat.current() is None:
        achieved = count_macs(backup, x) / max(count_macs(result.model, x), 1)
        if abs(achieved - target["speedup"]) > TOLERANCE * target["speedup"]:
            raise PrunekitError(
                f"method {m.name!r} reached {achieved:.2f}x by an independent MACs count, not the "
                f"{target['speedup']:g}x asked (the analytic model of this architecture is off, e.g. channels "
                "split by chunk); pass the layers concerned in ignored_layers")
    return result


class _Packed(nn.Module):
    """A model of several inputs seen as a model of one: its float inputs flattened per sample and joined.

    Tracing, MACs counting and every method call ``model(x)`` and slice ``x[:1]``; packing keeps all of
    that (per-sample shapes are fixed, the batch dimension stays first) while the surgery acts on the
    model's own layers.
    """

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]):
        super().__init__()
        self.model = model
        self.shapes = [tuple(t.shape[1:]) for t in inputs]
        self.sizes = [math.prod(s) for s in self.shapes]

    def pack(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in inputs], dim=1)

    def forward(self, x: torch.Tensor):
        parts = torch.split(x, self.sizes, dim=1)
        return self.model(*(p.reshape(x.shape[0], *s) for p, s in zip(parts, self.shapes, strict=True)))


def _several_inputs(model: nn.Module, ctx: Context, method: str, **kwargs: Any) -> PruneResult:
    """``prune`` for a model called as ``model(*example_inputs)``: pruned through ``_Packed``, and restored
    exactly (the model itself, not only the wrapper) if anything fails: ``_all_or_nothing`` puts its copy of
    the original into the wrapper, and the model takes that copy's state."""
    inputs = tuple(ctx.example_inputs)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs) or \
            len({t.shape[0] for t in inputs}) != 1 or any(t.dim() < 2 for t in inputs):
        raise PrunekitError("several example inputs must be float tensors of one batch size, each shaped "
                            "(batch, ...)")
    if ctx.data is not None or ctx.val is not None:
        raise PrunekitError(f"a model of several inputs is pruned by data-free methods only; {method!r} was "
                            "given data")
    packed = _Packed(model, inputs)
    ctx.example_inputs = packed.pack(tuple(t.to(ctx.device) for t in inputs))
    try:
        result = prune(packed, method, ctx=ctx, **kwargs)
    except BaseException:
        if packed.model is not model:  # restored from the copy made before anything changed
            model.__dict__.update(packed.model.__dict__)
        raise
    result.model = model
    return result


def _shapes(shapes: list[torch.Size]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)
