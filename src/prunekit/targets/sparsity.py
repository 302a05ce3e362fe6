"""A sparsity target: the share of prunable weights set to zero (unstructured methods), given once or as a
``schedule`` of increasing sparsities, one per cycle of a recurrent prune."""

from __future__ import annotations

import math
from typing import Any

from .base import ZEROS, Target, number

_REFUSAL = "a sparsity target needs a method that zeroes weights (unstructured): give speedup"


def _fraction(value: Any) -> bool:
    return number(value) and math.isfinite(value) and 0 <= value < 1


def _check(value: Any) -> str | None:
    return None if _fraction(value) else f"must be in [0, 1), got {value!r}"


def _check_schedule(value: Any) -> str | None:
    ok = isinstance(value, list) and all(_fraction(s) for s in value) and value == sorted(value)
    return None if ok else f"must be increasing sparsities in [0, 1) (one per cycle), got {str(value)[:80]}"


# no cell name: compare ranks channel pruning by speedup, and refuses unstructured methods
TARGET = Target("sparsity", {"sparsity": (int, float)}, ZEROS, _REFUSAL, _check, order=1)
SCHEDULE = Target("schedule", {"schedule": list}, ZEROS, _REFUSAL, _check_schedule, order=2)
