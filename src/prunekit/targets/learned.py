"""A learned target: the method chooses its own cut from the distribution of its scores (adaptive-slim's
threshold learned from the BN |γ| mixture); a speedup given beside it caps the cut."""

from __future__ import annotations

from .base import LEARNS, Target

TARGET = Target("learned", {"learned": bool}, LEARNS,
                "'learned' is for methods that choose their own cut (adaptive-slim)",
                lambda value: None if isinstance(value, bool) else f"must be true or false, got {value!r}",
                lambda t: "learned", order=3)
