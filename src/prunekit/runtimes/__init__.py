"""Runtimes: where a model is timed and served, one row each.

A runtime turns a model and an input batch into a call that runs it (``prepare``); timing, latency
targets, compare and evaluation iterate the table below, so a new runtime (OpenVINO, TensorRT) is
one file here and one row in ``RUNTIMES``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunekitError


class Runtime:
    """One way to run a model: its name in configs, its short key in result tables, what it needs installed."""

    name: str = ""
    key: str = ""  # prefix of result keys such as ``ort_b64``
    package: str | None = None  # the Python package it runs on (None: torch itself)
    summary: str = ""

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def check(self) -> None:
        """One PrunekitError naming the remedy when the runtime cannot run here."""
        if not self.available():
            raise PrunekitError(f"runtime {self.name} is not installed: pip install {self.package}, "
                                "or use runtime eager")

    def version(self) -> str | None:
        return importlib.metadata.version(self.package) if self.package else None

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int, folder: Path,
                name: str) -> Callable[[], object]:
        """A call that runs ``model`` on ``x`` in this runtime (files it needs go under ``folder``)."""
        raise NotImplementedError


from .eager import Eager  # noqa: E402
from .ort import OnnxRuntime  # noqa: E402
from .ort_int8 import OnnxRuntimeInt8  # noqa: E402

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
