"""The runtime contract: a name, a result key, what it needs installed, and ``prepare`` (model -> call)."""

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
