"""Latency measured side by side, the only way a speedup on a shared machine means anything.

Every model is timed in the same process, with the thread count fixed, after a warm-up, in
interleaved rounds (each round times every model once, starting at a rotating position), so a
burst of load on the machine hits all of them alike. A model's speedup is the median over rounds of
(reference time / its time) in the same round; its spread is the interquartile range of those
per-round ratios. A ratio whose spread contains 1.0 is *within noise*: neither a speedup nor a
slowdown. Runtimes: PyTorch eager and ONNX Runtime (CPU execution provider).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PrunekitError
from .measure import hooked, steady_allocator

RUNTIMES = ("eager", "onnxruntime")
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


def _eager(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return model(x)

    return call


def _onnx(model: nn.Module, x: torch.Tensor, threads: int, folder: Path, name: str) -> Callable[[], object]:
    from .export import _session, _to_onnx

    path = folder / f"{name}.onnx"
    try:
        _to_onnx(model, x[:1], path, 17)
    except Exception as exc:
        raise PrunekitError(f"{name}: ONNX export for timing failed ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})") from exc
    sess = _session(path, threads, spinning=False)
    feed = {"input": x.numpy().astype(np.float32)}
    return lambda: sess.run(None, feed)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def side_by_side(models: dict[str, nn.Module], example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
                 runtimes: Sequence[str] = RUNTIMES, threads: int = 2, rounds: int = 15, warmup: int = 3,
                 mode: Callable[[nn.Module], AbstractContextManager] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict]]:
    """Time every model in every runtime and batch size, interleaved; the first model is the reference.

    Returns ``{"eager_b1": {name: {"median_ms", "q1_ms", "q3_ms", "ratio": ratio_stats}}, ...}``. ``mode(model)``
    is entered around each model's runs and its export (a detector's single-output export mode).
    """
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise PrunekitError(f"unknown runtime {unknown[0]!r}; allowed: {', '.join(RUNTIMES)}")
    if rounds < 1 or threads < 1 or any(b < 1 for b in batch_sizes):
        raise PrunekitError("rounds, threads and batch sizes must be >= 1")
    mode = mode or (lambda m: contextlib.nullcontext())
    steady_allocator()
    names = list(models)
    one = example_input[:1].detach().cpu().float()
    results: dict[str, dict[str, dict]] = {}
    with contextlib.ExitStack() as stack, _threads(threads), tempfile.TemporaryDirectory() as tmp:
        for name in names:
            stack.enter_context(hooked(models[name].cpu()))
            stack.enter_context(mode(models[name]))
        for runtime in runtimes:
            for b in batch_sizes:
                x = one.expand(b, *one.shape[1:]).contiguous()
                key = f"{'ort' if runtime == 'onnxruntime' else runtime}_b{b}"
                if progress:
                    progress(f"timing {key}: {len(names)} models x {rounds} interleaved rounds, {threads} threads")
                calls = {n: _eager(models[n], x) if runtime == "eager" else _onnx(models[n], x, threads, Path(tmp), n)
                         for n in names}
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
                results[key] = {}
                for n in names:
                    t = times[n]
                    q = statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0]] * 3
                    results[key][n] = {"median_ms": statistics.median(t), "q1_ms": q[0], "q3_ms": q[2],
                                       "ratio": ratio_stats(times[names[0]], t)}
    return results
