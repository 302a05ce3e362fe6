"""A speedup target: the pruned model's analytic MACs are the base's divided by it (within 3 %, counted
independently after the cut). Channel-removing methods prune to it; adaptive ones take it as a cap."""

from __future__ import annotations

import math
from typing import Any

from .base import REMOVES, Target, number


def _check(value: Any) -> str | None:
    if not number(value) or not math.isfinite(value) or value < 1:
        return f"must be a finite number >= 1 (base MACs / pruned MACs), got {value!r}"
    return None


TARGET = Target("speedup", {"speedup": (int, float)}, REMOVES,
                "a speedup target needs a method that removes channels: give sparsity (or schedule)",
                _check, lambda t: f"{float(t['speedup']):g}x", excludes={"sparsity": "give one of speedup or sparsity"},
                order=0)
