"""Runtimes: where a model is timed and served, one row each.

A runtime turns a model and an input batch into a call that runs it (``prepare``); timing, latency
targets, compare and evaluation iterate the table below, so a new runtime (OpenVINO, TensorRT) is
one file here and one row in ``RUNTIMES``.
"""

from __future__ import annotations

from ..errors import PrunekitError
from .base import Runtime
from .eager import Eager
from .ort import OnnxRuntime
from .ort_int8 import OnnxRuntimeInt8

__all__ = ["DEFAULT", "RUNTIMES", "Runtime", "get", "names"]

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (Eager(), OnnxRuntime(), OnnxRuntimeInt8())}
DEFAULT = ("eager", "onnxruntime")  # what a table times unless told: int8 costs a quantisation per model


def get(name: object) -> Runtime:
    """The runtime called ``name``, checked to run here; one line naming the allowed ones otherwise."""
    if not isinstance(name, str) or name not in RUNTIMES:
        raise PrunekitError(f"unknown runtime {name!r}; allowed: {', '.join(RUNTIMES)}")
    runtime = RUNTIMES[name]
    runtime.check()
    return runtime


def names() -> tuple[str, ...]:
    return tuple(RUNTIMES)
