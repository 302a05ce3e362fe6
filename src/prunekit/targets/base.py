"""What every target kind declares (``Target``) and the one error a bad target raises (``TargetError``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PrunekitError


class TargetError(PrunekitError):
    """A target that cannot be pruned to; ``key`` names it (None: the target as a whole), ``reason`` says why,
    so a config says ``config error: target.<key>: <reason>`` and the API ``message`` (the reason itself
    unless given; ``bad_value`` names the key)."""

    def __init__(self, key: str | None, reason: str, message: str | None = None):
        self.key, self.reason = key, reason
        super().__init__(message or reason)

    @classmethod
    def bad_value(cls, key: str, problem: str) -> TargetError:
        """A wrong value (``problem``: "must be ..."): the API says ``"<key> <problem>"``."""
        return cls(key, problem, f"{key} {problem}")


# What a kind of method does (``methods.kinds`` declares which kind does which); a target needs one of them.
REMOVES, COST, ZEROS, LEARNS = "removes channels", "cuts to a cost", "zeros weights", "learns its cut"


@dataclass(frozen=True)
class Target:
    """A kind of target. ``types``: its config keys (itself and its settings) and their YAML types;
    ``check(value)`` returns the problem with a value ("must be ...") or None;
    ``needs``: what a method's kind must do to take it (one of ``methods.kinds``' capabilities), ``refusal``
    what a method of a kind that does not is told; ``settings``:
    the keys saying where it is measured, checked by ``check_settings``; ``excludes``: keys it cannot be given
    with, and why; ``name(target)``: its compare cell name (None: a kind compare does not rank)."""

    key: str
    types: dict[str, type | tuple[type, ...]]
    needs: str
    refusal: str
    check: Callable[[Any], str | None]
    name: Callable[[dict], str] | None = None
    check_settings: Callable[[dict], None] = lambda target: None
    excludes: dict[str, str] = field(default_factory=dict)
    order: int = 100  # where it is listed; a target of several kinds names its compare cell by the first

    @property
    def settings(self) -> tuple[str, ...]:
        """The keys that say where it is measured (all its keys but itself)."""
        return tuple(k for k in self.types if k != self.key)


def number(value: Any) -> bool:
    """An int or float that is not a bool (YAML's ``true`` is not a target)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
