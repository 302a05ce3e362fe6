"""Targets: what a prune aims at. Each kind is one module declaring a ``Target``: the config key, what it
needs a method's kind to do (one of ``base.REMOVES``, ``COST``, ``ZEROS``, ``LEARNS``), the check of its value
and the name of its compare cell. ``methods.prune``, the pipeline and compare check a target only through
``check`` here, and every ``Target`` a module of this package declares is found (``_found``), so a new kind is
one module and nothing else."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import Target, TargetError


def _found() -> list[Target]:
    """Every ``Target`` declared at the top of a module of this package, in their declared ``order``."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [v for v in vars(module).values() if isinstance(v, Target)]
    return sorted(found, key=lambda t: t.order)


TARGETS: dict[str, Target] = {t.key: t for t in _found()}
SETTINGS = {s: t for t in TARGETS.values() for s in t.settings}  # keys that say where a target is measured

__all__ = ["SETTINGS", "TARGETS", "Target", "TargetError", "check", "check_kind", "check_values", "given",
           "name"]


def given(target: dict) -> list[Target]:
    """The kinds a target mapping gives (a key set to null or false gives none)."""
    return [t for k, t in TARGETS.items() if target.get(k) is not None and target.get(k) is not False]


def check_values(target: dict) -> None:
    """Each given target's value and settings, and that no two exclude each other; one ``TargetError``."""
    given_ = given(target)
    for s, t in SETTINGS.items():
        if s in target and t not in given_:
            raise TargetError(None, f"{', '.join(t.settings[:-1])} and {t.settings[-1]} say where a {t.key} target "
                                    f"is timed: add target.{t.key}")
    for t in given_:
        for other, why in t.excludes.items():
            if target.get(other) is not None:
                raise TargetError(None, why)
        problem = t.check(target[t.key])
        if problem:
            raise TargetError.bad_value(t.key, problem)
        t.check_settings(target)


def check(method: Any, target: dict) -> None:
    """``check_values``, then ``check_kind``: one ``TargetError`` for any target ``method`` cannot prune to."""
    check_values(target)
    check_kind(method, target)


def check_kind(method: Any, target: dict) -> None:
    """That the kind of ``method`` (a ``methods.Method``) does what each given target needs."""
    for t in given(target):
        if t.needs not in method.kind.does:
            raise TargetError(t.key, f"method {method.name!r} is {method.kind.name}: {t.refusal}")


def name(target: dict) -> str:
    """The compare cell name of a (checked) target: the first given kind names it."""
    kind = given(target)[0]
    if kind.name is None:
        raise TargetError(kind.key, f"a {kind.key} target is not ranked by compare (it ranks speedups)")
    return kind.name(target)
