"""Latency measured side by side, the only way a speedup on a shared machine means anything.

Every model is timed in the same process, with the thread count fixed, after a warm-up, in
interleaved rounds (each round times every model once, starting at a rotating position), so a
burst of load on the machine hits all of them alike. A model's speedup is the median over rounds of
(reference time / its time) in the same round; its spread is the interquartile range of those
per-round ratios. A ratio whose spread contains 1.0 is *within noise*: neither a speedup nor a
slowdown. Runtimes are the rows of ``prunekit.runtimes.RUNTIMES``; ``across=True`` times every model on
every runtime in one set of rounds, so "int8 pruned vs fp32 base" is a ratio measured side by side too.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError
from .measure import hooked, repeat_ms, steady_allocator
from .runtimes import DEFAULT as DEFAULT_RUNTIMES
from .runtimes import get as get_runtime

MIN_TIMED_S = 0.005  # a timed sample repeats a fast call until it lasts about this long


def ratio_stats(ref: Sequence[float], times: Sequence[float]) -> dict[str, float | bool]:
    """Median and interquartile spread of the per-round ratios ref/time; ``within_noise`` if the spread holds 1."""
    ratios = [r / t for r, t in zip(ref, times, strict=True)]
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return {"median": statistics.median(ratios), "lo": q1, "hi": q3, "within_noise": bool(q1 <= 1.0 <= q3)}


def label(stats: dict) -> str:
    """``1.83x (1.71-1.92)`` or ``within noise (0.97-1.04)``: how a ratio is shown to a person."""
    if stats.get("median") is None:
        return "–"
    spread = f"({stats['lo']:.2f}-{stats['hi']:.2f})"
    return f"within noise {spread}" if stats["within_noise"] else f"{stats['median']:.2f}x {spread}"


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_fits(one: torch.Tensor, batch: int) -> None:
    """Refuse a batch whose input alone would take more than an eighth of this machine's memory (before any
    allocation: a batch of a billion would otherwise die in the allocator with torch's internal message)."""
    need = batch * one.numel() * 4
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > total / 8:
        raise PrunekitError(f"batch {batch} needs {need / 2 ** 30:.1f} GiB for its input alone, more than this "
                            f"machine's memory allows ({total / 2 ** 30:.0f} GiB in all); time a smaller batch")


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, dict]:
    """Time the calls in interleaved rounds; ratios against the first call, round by round."""
    names = list(calls)
    inner = {}
    for n, call in calls.items():  # warm-up, and how many calls make one timed sample
        for _ in range(warmup):
            call()
        t0 = time.perf_counter()
        call()
        inner[n] = max(1, int(MIN_TIMED_S / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner[n]):
                calls[n]()
            times[n].append(1e3 * (time.perf_counter() - t0) / inner[n])
    out = {}
    for n in names:
        t = times[n]
        q = statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0]] * 3
        out[n] = {"median_ms": statistics.median(t), "q1_ms": q[0], "q3_ms": q[2],
                  "ratio": ratio_stats(times[names[0]], t)}
    return out


def sequential(model: nn.Module, example_input: torch.Tensor, *, runtime: str = "onnxruntime",
               batch_sizes: Sequence[int] = (1, 64), repeats: int = 30, warmup: int = 5,
               threads: int | None = None) -> dict[str, dict[str, float | int | str]]:
    """One model's median latency (ms) per batch size in one runtime of the table, timed alone (``measure``'s
    loop; ``threads`` None: torch's count). A speedup is a ratio of two of these only on a quiet machine:
    ``side_by_side`` times models together."""
    rt = get_runtime(runtime)
    threads = threads or torch.get_num_threads()
    one = example_input[:1].detach().cpu().float()
    _check_fits(one, max(batch_sizes))
    steady_allocator()
    res: dict[str, dict[str, float | int | str]] = {}
    with _threads(threads), hooked(model.cpu()), tempfile.TemporaryDirectory() as tmp:
        for b in batch_sizes:
            call = rt.prepare(model, one.expand(b, *one.shape[1:]).contiguous(), threads, Path(tmp), "model")
            res[f"b{b}"] = {**repeat_ms(call, repeats, warmup), "repeats": repeats, "threads": threads,
                            "runtime": rt.name}
    return res


def side_by_side(models: dict[str, nn.Module], example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
                 runtimes: Sequence[str] = DEFAULT_RUNTIMES, threads: int = 2, rounds: int = 15, warmup: int = 3,
                 mode: Callable[[nn.Module], AbstractContextManager] | None = None,
                 progress: Callable[[str], None] | None = None, across: bool = False) -> dict[str, dict[str, dict]]:
    """Time every model in every runtime and batch size, interleaved; the first model is the reference.

    Returns ``{"eager_b1": {name: {"median_ms", "q1_ms", "q3_ms", "ratio": ratio_stats}}, ...}``; with
    ``across``, ``{"b1": {"name/ort-int8": ...}}``, one table per batch whose reference is the first model on
    the first runtime. ``mode(model)`` is entered around each model's runs and its export (a detector's
    single-output export mode).
    """
    rts = [get_runtime(r) for r in runtimes]
    if rounds < 1 or threads < 1 or any(b < 1 for b in batch_sizes):
        raise PrunekitError("rounds, threads and batch sizes must be >= 1")
    mode = mode or (lambda m: contextlib.nullcontext())
    one = example_input[:1].detach().cpu().float()
    _check_fits(one, max(batch_sizes))
    steady_allocator()
    names = list(models)
    results: dict[str, dict[str, dict]] = {}
    with contextlib.ExitStack() as stack, _threads(threads), tempfile.TemporaryDirectory() as tmp:
        for name in names:
            stack.enter_context(hooked(models[name].cpu()))
            stack.enter_context(mode(models[name]))
        groups = [(f"b{b}", b, rts) for b in batch_sizes] if across else \
            [(f"{rt.key}_b{b}", b, [rt]) for rt in rts for b in batch_sizes]
        for key, b, group in groups:
            x = one.expand(b, *one.shape[1:]).contiguous()
            if progress:
                progress(f"timing {key}: {len(names) * len(group)} models x {rounds} interleaved rounds, "
                         f"{threads} threads")
            calls = {(f"{n}/{rt.key}" if across else n): rt.prepare(models[n], x, threads, Path(tmp), n)
                     for rt in group for n in names}
            results[key] = interleaved(calls, rounds, warmup)
    return results
