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

import importlib
import itertools
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import tasks
from ..errors import PrunekitError
from ..options import Field
from ..tasks import Task
from . import kinds
from .kinds import Kind


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

    @property
    def field(self) -> Field:
        """Its type, range and choices, checked as every config key is (``prunekit.options``)."""
        return Field(self.type, self.minimum, self.maximum, self.choices)

    def type_name(self) -> str:
        return self.field.type_name()

    def check(self, value: Any, method: str) -> Any:
        """The value, or a PrunekitError naming the method, the option and what it accepts."""
        problem = self.field.problem(value)
        if problem:
            raise PrunekitError(f"method {method!r}: option {self.name} {problem}")
        return value


# Every channel-removing method takes it; prune() applies it after the cut, so no method implements it.
BN_RECALIBRATE = Option("bn_recalibrate", int, 0, "re-estimate BN statistics on this many calibration batches of "
                        "the training split after the cut (0: off); no gradient step", minimum=0)


# ---- what a method receives ----
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Context:
    """Everything a method may use besides the model and its options.

    ``data`` yields ``(inputs, targets)`` batches of the training split (calibration, statistics);
    ``val`` is a held-out split of the *training* data for scoring decisions; ``evaluate(model, batches)``
    returns the task's metrics (``task.metric`` among them, e.g. ``top1``). Any of them may be missing
    for methods that need no data; ``require`` turns that into one clear error. ``cost_model``: what a keep
    decision costs in place of MACs (a latency target's table); methods see it only through ``graph``.
    """

    example_inputs: torch.Tensor
    data: Batches | None = None
    val: Batches | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    task: Task = field(default_factory=lambda: tasks.get(tasks.DEFAULT))
    cost_model: Any = None

    def graph(self, model: nn.Module, **options: Any) -> Any:
        """``model``'s PruneGraph on the example inputs, its budgets counted in this context's currency."""
        from ..graph import PruneGraph

        return PruneGraph(model, self.example_inputs, cost_model=self.cost_model, **options)

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
    kind: Kind  # what it does to a model (``kinds.KINDS``): structured, unstructured, adaptive
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
        self.kind.check_target(self.name, self.own_cut(opts), targets)

    @property
    def target(self) -> str:
        return self.kind.shows

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

    row = kinds.get(kind)
    options = (*options, BN_RECALIBRATE) if row.removes_channels else tuple(options)

    def deco(fn: Callable[..., PruneResult]) -> Callable[..., PruneResult]:
        REGISTRY[name] = Method(name, summary, row, fn, {o.name: o for o in options}, needs_data, regularizer,
                                {o.name: o for o in regularizer_options}, keeps_zeros, figures, needs_batchnorm,
                                *([own_cut] if own_cut is not None else []))
        return fn

    return deco


def _load_all() -> None:
    """Import every module of this package: each registers its methods (no list to keep in step)."""
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        importlib.import_module(f"{__package__}.{info.name}")


def available() -> list[Method]:
    """All registered methods, in registration order."""
    _load_all()
    return list(REGISTRY.values())


def get(name: str) -> Method:
    _load_all()
    if name not in REGISTRY:
        raise PrunekitError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)} (see `prunekit methods`)")
    return REGISTRY[name]

