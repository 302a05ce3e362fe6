"""Pruning methods by name: the registry behind ``prunekit.prune`` and ``prunekit methods``.

Each method is a module in this package that reads like its paper and registers itself with
``register``. A method receives the model and example inputs and returns a ``PruneResult``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError
from ..measure import count_params


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

    @property
    def speedup(self) -> float:
        """Achieved theoretical MACs ratio base/pruned."""
        return self.before["macs"] / max(self.after["macs"], 1)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "before": self.before, "after": self.after,
                "speedup": self.speedup, "channels": {k: list(v) for k, v in self.channels.items()},
                "blocks_removed": self.blocks_removed, "info": self.info}

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"{self.method}: MACs {b['macs'] / 1e6:.2f}M -> {a['macs'] / 1e6:.2f}M ({self.speedup:.2f}x), "
                f"params {b['params'] / 1e6:.3f}M -> {a['params'] / 1e6:.3f}M")


@dataclass
class Method:
    name: str
    summary: str
    kind: str  # "structured" (speedup target), "unstructured" (sparsity), "adaptive" (learned threshold)
    fn: Callable[..., PruneResult]


REGISTRY: dict[str, Method] = {}
_MODULES = ("baselines", "dist_fit", "magnitude", "adaptive_slim")


def register(name: str, summary: str, kind: str = "structured") -> Callable:
    """Decorator: make ``fn(model, example_inputs, **opts) -> PruneResult`` available by ``name``."""

    def deco(fn: Callable[..., PruneResult]) -> Callable[..., PruneResult]:
        REGISTRY[name] = Method(name, summary, kind, fn)
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"{__name__}.{mod}")


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


def prune(model: nn.Module, method: str, example_inputs: torch.Tensor, *, speedup: float | None = None,
          sparsity: float | None = None, data: Any = None, **options: Any) -> PruneResult:
    """Prune ``model`` in place with ``method``; see ``prunekit methods`` for names and targets."""
    m = get(method)
    if m.kind == "structured" and speedup is None and options.get("percentile") is None:
        raise PrunekitError(f"method {method!r} needs a speedup target (e.g. speedup=2.0)")
    if m.kind == "unstructured" and sparsity is None and options.get("q") is None:
        raise PrunekitError(f"method {method!r} needs a sparsity target (e.g. sparsity=0.9) or a per-layer q")
    if speedup is not None and speedup < 1.0:
        raise PrunekitError(f"speedup must be >= 1.0 (base MACs / pruned MACs), got {speedup}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {sparsity}")
    if not isinstance(example_inputs, torch.Tensor):
        raise PrunekitError("example_inputs must be a tensor batch shaped like the model's input")
    dev = next(model.parameters()).device
    return m.fn(model, example_inputs.to(dev), speedup=speedup, sparsity=sparsity, data=data, **options)
