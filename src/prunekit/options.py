"""One declared schema for every config section: a method's options, a run config's and a compare config's keys.

A key's type, range and allowed values are declared once, where its section is defined, as a ``Field``;
``check_section`` checks a section against its schema before any work runs, so every refusal names the key and
what it accepts, worded alike wherever the key is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PrunekitError


@dataclass(frozen=True)
class Field:
    """A key's accepted type(s), and for numbers the range; ``choices``: the allowed values (for a number that
    also has a range: words allowed besides the range, e.g. ``auto``)."""

    type: type | tuple[type, ...]
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None

    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " or ".join("null" if t is type(None) else t.__name__ for t in types)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused ("must be int, got 'x'", "must be >= 1, got 0"), or None."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        ok = isinstance(value, types) and not (  # YAML's true is not a number
            isinstance(value, bool) and bool not in types and (int in types or float in types))
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            return f"must be {self.type_name()}, got {_short(value)}"
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        ranged = self.minimum is not None or self.maximum is not None
        if self.choices is not None and value not in self.choices and not (numeric and ranged):
            return f"must be one of {', '.join(map(str, self.choices))}, got {_short(value)}"
        if numeric and ((self.minimum is not None and value < self.minimum) or
                        (self.maximum is not None and value > self.maximum)):
            return f"must be {self.range()}, got {value!r}"
        return None

    def range(self) -> str:
        """The declared range in words: ">= 1", "<= 0.5" or "in [0, 1]"."""
        if self.maximum is None:
            return f">= {_number(self.minimum)}"
        if self.minimum is None:
            return f"<= {_number(self.maximum)}"
        return f"in [{_number(self.minimum)}, {_number(self.maximum)}]"


def _number(x: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _short(value: Any) -> str:
    """A refused value as the error shows it: its repr, cut to one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


Schema = Mapping[str, Field | type | tuple]
SEED = Field(int, 0, 2 ** 32 - 1)  # a random generator's seed
POSITIVE = Field(int, minimum=1)  # a count: batches, sizes, threads


def field_of(spec: Field | type | tuple) -> Field:
    """A schema entry as a ``Field`` (a bare type, or tuple of types, declares the type only)."""
    return spec if isinstance(spec, Field) else Field(spec)


def check_section(section: Any, schema: Schema, where: str, err: Callable[[str, str], PrunekitError], *,
                  nulls: bool = True) -> dict:
    """``section`` against ``schema``: a mapping, no unknown key, every value of its declared type and range.
    ``err(key, reason)`` builds the section's error (``key`` dotted from ``where``); ``nulls=False`` also refuses
    a key written with no value, so it is said here, not inside a run after others ran."""
    if not isinstance(section, dict):
        raise err(where, "must be a mapping")
    unknown = sorted(set(section) - set(schema))
    name = (lambda k: f"{where}.{k}" if where else k)  # noqa: E731
    if unknown:
        raise err(name(unknown[0]), f"unknown key; allowed: {', '.join(sorted(schema))}")
    for k, v in section.items():
        if v is None:
            if not nulls:
                raise err(name(k), "has no value (null); give one or leave the key out")
            continue
        problem = field_of(schema[k]).problem(v)
        if problem:
            raise err(name(k), problem)
    return section
