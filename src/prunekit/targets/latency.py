"""A latency target: prune to a *measured* speedup on a runtime, not to a MACs ratio.

The search prunes copies to the latency table's predicted speedup (``prunekit.latency``), times each side by
side with the unpruned model, and corrects what it asks for from what it measured, until the measured median
lands within 5 % (timed twice). "Latency X" means at least X: where the asked speed falls between two
neighbouring prunes, the least-pruned one measured above it (its spread too) is kept, with a note; it refuses
only when pruning as far as the method goes is still too slow, or after eight timings.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import latency as lat
from .. import runtimes
from ..errors import PrunekitError
from .base import COST, Target, TargetError, number

LATENCY_TOLERANCE = 0.05  # a latency target is met when the measured median lies within 5 % of it
LATENCY_TRIES = 8  # timings (a landing one and its second count two) before the search gives up
LATENCY_PRUNES = 40  # prunes (cheap: a keep map met before is not timed again) before the search gives up
NEIGHBOURS = 1.001  # predicted speedups closer than this ratio hold no keep map between them


def _keep_map(model: nn.Module) -> tuple:
    """What a prune's timing depends on: every parameter's shape (two prunes with the same shapes time alike)."""
    return tuple(tuple(p.shape) for p in model.parameters())


def _bracket(points: list[dict], asked: float) -> tuple[dict, dict] | None:
    """The two prunes, neighbours in predicted speedup, whose measurements straddle ``asked`` with the least
    predicted speedup between them (timing noise can make measured speedup fall where predicted rises, so the
    bracket is read along the predicted axis, the one the search moves on); None when all lie on one side."""
    ranked = sorted(points, key=lambda t: t["predicted"])
    pairs = [(a, b) for a, b in zip(ranked, ranked[1:], strict=False) if _reaches(a, asked) != _reaches(b, asked)]
    if not pairs:
        return None
    a, b = min(pairs, key=lambda ab: ab[1]["predicted"] / ab[0]["predicted"])
    return (b, a) if _reaches(a, asked) else (a, b)


def _reaches(t: dict, asked: float) -> bool:
    """A measurement reaches ``asked`` when its median does and its spread does not hold it (within noise of
    the target counts as not reaching it: "latency X" means at least X)."""
    return t["speedup"] >= asked and t["lo"] > asked


def _next_ask(points: list[dict], asked: float) -> float:
    """The predicted speedup to prune to next: between the two prunes whose measurements bracket ``asked``
    (log-log interpolation); else beyond the outermost prune on the short side, along the secant through the
    two outermost prunes there (measured speedup grows more slowly than predicted where the table is off, so
    a plain asked/measured correction creeps), at least 5 % and at most a factor 2 further out."""
    bracket = _bracket(points, asked)
    if bracket:
        lo, hi = bracket
        ratio = math.log(hi["speedup"] / lo["speedup"])
        f = math.log(asked / lo["speedup"]) / ratio if abs(ratio) > 1e-9 else 0.5
        f = min(max(f, 0.1), 0.9)  # strictly inside: a keep map met again there narrows the bracket
        return lo["predicted"] * (hi["predicted"] / lo["predicted"]) ** f
    side = sorted(points, key=lambda t: t["predicted"], reverse=points[0]["speedup"] < asked)  # outermost first
    edge = side[0]
    step = math.log(asked / edge["speedup"])  # in log measured speedup: > 0 below asked, < 0 above
    if len(side) > 1 and side[1]["predicted"] != edge["predicted"]:
        slope = math.log(edge["speedup"] / side[1]["speedup"]) / math.log(edge["predicted"] / side[1]["predicted"])
        if slope > 0.1:  # measured rises with predicted: follow the secant
            step /= slope
    step = math.copysign(min(max(abs(step), math.log(1.05)), math.log(2)), step)
    return edge["predicted"] * math.exp(step)


def _pooled(timings: list[dict]) -> dict:
    """One keep map's timings as one measurement: the mean speedup, the widest spread."""
    mean = lambda k: sum(t[k] for t in timings) / len(timings)  # noqa: E731
    lo, hi = min(t["lo"] for t in timings), max(t["hi"] for t in timings)
    return {"speedup": mean("speedup"), "lo": lo, "hi": hi, "within_noise": bool(lo <= 1 <= hi),
            "base_ms": mean("base_ms"), "pruned_ms": mean("pruned_ms")}


def _latency_error(msg: str, closest: dict, **extra: Any) -> PrunekitError:
    err = PrunekitError(msg)
    err.closest = closest  # the measurement a caller can judge the miss by (timing noise or reach)
    for k, v in extra.items():
        setattr(err, k, v)
    return err


def search(model: nn.Module, backup: nn.Module, ctx: Any, m: Any, target: dict, opts: dict,
           shapes: list[torch.Size], checked: Callable[..., Any]) -> Any:
    """Prune copies to the latency table's predicted speedup, time each side by side with the unpruned model,
    and correct the predicted speedup asked for from what was measured (``_next_ask``) until the measured
    median lands (and, timed again, the mean of both timings); the winning copy's modules then become the model's.

    Widths are discrete: a keep map met before is not timed again (its measurement is reused), and when the
    two prunes bracketing the target are neighbours (no keep map between them) the least-pruned prune measured
    at least the target (its spread above it) is kept, with a note naming both. Out of reach by the table, the
    most the method prunes is measured once: the error names it.
    """
    asked = target["latency"]
    setting = {k: target[k] for k in ("runtime", "batch", "threads")}
    where = f"{setting['runtime']} (batch {setting['batch']}, {setting['threads']} threads)"
    table = lat.table(backup, ctx.example_inputs, **setting)
    priced = dataclasses.replace(ctx, cost_model=table)  # every keep decision costs its predicted latency
    known: dict[tuple, list[dict]] = {}  # keep map -> its timings
    reached: dict[tuple, tuple] = {}  # keep map measured above the target -> (ask, pruned copy, result)
    note = None
    tries: list[dict] = []  # every timing, in order (reported)
    points: list[dict] = []  # every prune: its predicted speedup and its keep map's measurement
    ask, at_most = asked, False
    while True:
        trial = copy.deepcopy(backup)
        try:
            result = checked(trial, backup, priced, m, {"speedup": ask}, opts, shapes)
        except PrunekitError as exc:
            reachable = getattr(exc, "reachable", None)
            if reachable is None or at_most:
                raise
            ask, at_most = reachable, True  # as far as the method prunes: measure that once
            continue
        sig = _keep_map(trial)
        if sig not in known:
            known[sig] = [lat.measure(backup, trial, ctx.example_inputs, **setting)]
            tries.append({"predicted": ask, **known[sig][0]})
            if abs(known[sig][0]["speedup"] / asked - 1) <= LATENCY_TOLERANCE:  # landed: timed again, and kept
                known[sig].append(lat.measure(backup, trial, ctx.example_inputs, **setting))  # if the mean lands
                tries.append({"predicted": ask, **known[sig][1]})
        got = _pooled(known[sig])
        if len(known[sig]) > 1 and abs(got["speedup"] / asked - 1) <= LATENCY_TOLERANCE:  # a landing, confirmed
            break
        points.append({"predicted": ask, **got})
        if at_most and not any(t["speedup"] >= asked for t in points):  # not even the fastest prune reaches it
            raise _latency_error(f"latency {asked:g}x is out of reach on {where}: pruning as far as {m.name!r} goes "
                                 f"measures {got['speedup']:.2f}x ({got['lo']:.2f}-{got['hi']:.2f}); lower the "
                                 "target or min_keep", got)
        if _reaches(got, asked):
            reached.setdefault(sig, (ask, trial, result))
        bracket = _bracket(points, asked)
        if bracket and max(bracket[0]["predicted"], bracket[1]["predicted"]) / \
                min(bracket[0]["predicted"], bracket[1]["predicted"]) < NEIGHBOURS:
            lo, hi = bracket  # no prune between them: the least-pruned one that measures at least the target
            if not reached:
                raise _latency_error(f"latency {asked:g}x falls between two neighbouring prunes of {m.name!r} on "
                                     f"{where} and no prune measured above it stays there when timed again", hi)
            ask, trial, result = min(reached.values(), key=lambda r: r[0])
            got = _pooled(known[_keep_map(trial)])
            note = (f"latency {asked:g}x falls between two neighbouring prunes of {m.name!r} on {where}: "
                    f"{lo['speedup']:.2f}x ({lo['lo']:.2f}-{lo['hi']:.2f}) and {hi['speedup']:.2f}x "
                    f"({hi['lo']:.2f}-{hi['hi']:.2f}); kept the least-pruned one measured above it, "
                    f"{got['speedup']:.2f}x ({got['lo']:.2f}-{got['hi']:.2f})")
            break
        if len(tries) >= LATENCY_TRIES or len(points) >= LATENCY_PRUNES:
            best = min(tries, key=lambda t: abs(t["speedup"] - asked))
            raise _latency_error(f"latency {asked:g}x not reached within {LATENCY_TOLERANCE:.0%} on {where} in "
                                 f"{len(tries)} measurements: the closest {best['speedup']:.2f}x "
                                 f"({best['lo']:.2f}-{best['hi']:.2f}); ask for that, or time on a quieter machine",
                                 best)
        ask, at_most = max(1.0, _next_ask(points, asked)), False
    result.target = {"latency": asked, **setting} | {k: v for k, v in result.target.items() if k != "speedup"}
    result.measured = {**got, **setting, "predicted": ask, "tries": tries, "table": table.info,
                       **({"note": note} if note else {})}
    model.__dict__.update(trial.__dict__)  # the winning copy's modules, in the caller's model
    result.model = model
    return result


def _check(value: Any) -> str | None:
    if not number(value) or not math.isfinite(value) or value <= 1:
        return f"must be a finite number > 1 (base time / pruned time, measured), got {value!r}"
    return None


def _check_settings(target: dict) -> None:
    """Where it is timed: a runtime installed here, a batch and a thread count >= 1."""
    for key in ("batch", "threads"):
        value = target.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TargetError.bad_value(key, f"must be a positive integer, got {value!r}")
    try:
        lat.check_setting(target.get("runtime", "eager"), 1, 1)
    except PrunekitError as exc:
        raise TargetError("runtime", str(exc)) from exc


def _name(target: dict) -> str:
    """Where it is timed is part of its name (``lat2x-ort-b1-t2``): a target with its settings filled in."""
    rt = runtimes.RUNTIMES[target["runtime"]].key if target["runtime"] in runtimes.RUNTIMES else target["runtime"]
    return f"lat{float(target['latency']):g}x-{rt}-b{target['batch']}-t{target['threads']}"


TARGET = Target("latency", {"latency": (int, float), "runtime": str, "batch": int, "threads": int}, COST,
                "a latency target needs a method that removes channels to a target", _check, _name,
                check_settings=_check_settings,
                excludes={"speedup": "give latency (a measured speedup) or speedup (a MACs ratio), not both"},
                order=4)
