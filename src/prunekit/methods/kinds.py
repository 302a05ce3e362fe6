"""Kinds of method: what a kind does to a model, declared once, so targets, the guard, the pipeline and
compare ask the kind what it does instead of testing its name. A new kind (N:M sparsity, say) is one row here.

``does``: what targets need of a method (``targets.base``; each ``Target.needs`` one of them):
``removes channels`` (the model gets physically smaller, so a speedup is measurable, BN statistics can be
re-estimated, a prune that removed nothing is an error and compare ranks it), ``cuts to a cost`` (speedup or
latency targets set its cut exactly), ``zeros weights`` (unstructured: shapes stay, zeros are stored sparse)
and ``learns its cut`` (it chooses its own cut from the score distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PrunekitError
from ..targets.base import COST, LEARNS, REMOVES, ZEROS


@dataclass(frozen=True)
class Kind:
    """``shows``: the target ``prunekit methods`` lists; ``default``: the target key a bare ``prune`` call fills;
    ``cuts``: the target keys that set its cut (one of them, or an option of its own cut, is needed);
    ``own_cut_excludes``: its own cut and a cut target exclude each other (else the target calibrates it)."""

    name: str
    shows: str
    does: frozenset[str]
    default: str
    cuts: tuple[str, ...] = ()
    own_cut_excludes: bool = False

    @property
    def removes_channels(self) -> bool:
        return REMOVES in self.does

    def check_target(self, method: str, cut: str | None, targets: set[str]) -> None:
        """One PrunekitError if ``targets`` (the keys given) cannot set the cut of ``method`` with its own ``cut``."""
        given = sorted(targets & set(self.cuts))
        if self.cuts and not given and cut is None:
            example = {"speedup": "speedup=2.0", "sparsity": "sparsity=0.9"}.get(self.default, self.default)
            raise PrunekitError(f"method {method!r} needs a {self.default} target (e.g. {example})")
        if self.own_cut_excludes and cut is not None and given:
            raise PrunekitError(f"{cut} and {given[0]} both set the cut of method {method!r}: give one of them")


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("structured", "speedup", frozenset({REMOVES, COST}), "speedup", ("speedup", "latency"), True),
    Kind("unstructured", "sparsity", frozenset({ZEROS}), "sparsity", ("sparsity", "schedule")),
    Kind("adaptive", "learned (speedup caps)", frozenset({REMOVES, LEARNS}), "speedup"),
)}


def get(name: str) -> Kind:
    if name not in KINDS:
        raise PrunekitError(f"unknown method kind {name!r}; allowed: {', '.join(KINDS)}")
    return KINDS[name]
