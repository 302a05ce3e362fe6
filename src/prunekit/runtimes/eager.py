"""PyTorch eager on the CPU: the model as it is, no export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .base import Runtime


class Eager(Runtime):
    name, key, summary = "eager", "eager", "PyTorch eager"

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int, folder: Path,
                name: str) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return model(x)

        return call
