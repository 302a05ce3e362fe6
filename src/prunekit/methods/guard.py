"""``prune``, all or nothing: the call is checked before anything runs, and the method's result is kept
only if the pruned model still fits (every output keeps its shape, the target is confirmed by an independent
count or measurement); otherwise the user's model is restored exactly from a copy and one PrunekitError
says why. A model of several inputs is pruned through ``_Packed`` under the same guarantee."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .. import targets, tasks
from ..errors import PrunekitError
from ..graph import flat_tensors, run_checked
from ..measure import count_macs, hooked
from ..targets import latency as latency_target
from ..thresholds import TOLERANCE
from ..train import adapt_bn
from .registry import BN_RECALIBRATE, Batches, Context, Method, PruneResult, get


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
    given = {k: v for k, v in (("speedup", speedup), ("sparsity", sparsity), ("latency", latency)) if v is not None}
    targets.check(m, given | ({"runtime": runtime, "batch": batch, "threads": threads} if latency is not None else {}))
    m.check_target(opts, set(given))
    speedup, sparsity, latency = (None if v is None else float(v) for v in (speedup, sparsity, latency))
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
    target = {m.kind.default: {"sparsity": sparsity, "speedup": speedup}[m.kind.default]}
    if latency is not None:
        target = {"latency": latency, "runtime": runtime, "batch": batch, "threads": threads}
    return _all_or_nothing(model, ctx, m, target, opts)


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
    if "speedup" in m.kind.cuts and target.get("speedup") and m.own_cut(opts) is None and ctx.cost_model is None:
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
