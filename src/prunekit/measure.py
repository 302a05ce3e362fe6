"""What a model costs: parameters, MACs, bytes on disk and measured latency.

MACs are counted with PyTorch's own FLOP counter (conv, linear and matmul; one MAC = two
FLOPs), the convention of the published tables. Latency is the median of timed runs after a
warm-up with the thread count fixed and recorded, since single timings on a shared machine
are noise; on CUDA it is timed with CUDA events.
"""

from __future__ import annotations

import ctypes
import functools
import io as _io
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import PrunekitError


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (or of non-zero ones, for unstructured sparsity)."""
    if nonzero:
        return int(sum((p != 0).sum().item() for p in model.parameters()))
    return int(sum(p.numel() for p in model.parameters()))


# The layers whose MACs pruning changes (transposed convolutions included).
LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
# Layers whose weights unstructured pruning masks: every convolution, linear and embedding.
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


@contextmanager
def hooked(model: nn.Module, hooks: Iterable[tuple[nn.Module, Callable]] = (),
           pre_hooks: Iterable[tuple[nn.Module, Callable]] = (), *, grad: bool = False) -> Iterator[nn.Module]:
    """Eval mode, no grad and forward hooks for the ``with`` block; all restored whatever the forward raises.

    Every module's own training flag is restored (a frozen BN inside a training model stays frozen),
    so probing a model never changes it.
    """
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        handles += [m.register_forward_hook(fn) for m, fn in hooks]
        handles += [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
        model.eval()
        with torch.set_grad_enabled(grad):
            yield model
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode


def layer_macs(model: nn.Module, example_inputs: torch.Tensor, *, nonzero: bool = False,
               run: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> tuple[Any, dict[str, int]]:
    """(output, MACs per conv/linear layer) of one eval forward on ``example_inputs`` (batch as given).

    The one layer counter that pruning uses: a layer's MACs are its weight entries (only the non-zero
    ones with ``nonzero``, what an ideal sparse kernel would do) times the output positions it ran at
    (a transposed convolution: the input positions it scattered from, as PyTorch's FLOP counter does).
    Layers appear in the order they first ran; ``run(model, x)`` replaces ``model(x)`` (e.g. a forward
    that names the module that fails).
    """
    names = {m: n for n, m in model.named_modules()}
    counts: dict[str, int] = {}

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        weights = int((m.weight != 0).sum()) if nonzero else m.weight.numel()
        at = inp[0] if getattr(m, "transposed", False) else out
        positions = at.numel() // (at.shape[-1] if isinstance(m, nn.Linear) else at.shape[1])
        counts[names[m]] = counts.get(names[m], 0) + weights * positions

    layers = [(m, hook) for m in model.modules() if isinstance(m, LAYERS)]
    with hooked(model, layers):
        out = run(model, example_inputs) if run is not None else model(example_inputs)
    return out, counts


# PyTorch's counter knows the fused attention kernels of CUDA but not the CPU one; count it the same way.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)}


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any, *,
               run: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (batch as given).

    ``nn.MultiheadAttention``'s inference fast path (one fused kernel the counter cannot see into) is
    off while counting, so its projections and attention products count on every device.
    ``run(model, x)`` replaces ``model(x)`` (e.g. a forward that names the module that fails).
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with hooked(model), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            run(model, example_inputs) if run is not None else model(example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops() // 2)


def size_bytes(model: nn.Module) -> int:
    """Bytes of the serialised fp32 state dict, i.e. what a dense checkpoint costs on disk."""
    buf = _io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getbuffer().nbytes


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc), so every timed call runs on pages already mapped.

    By default glibc hands large freed blocks back to the OS and maps fresh ones on the next call, so
    activations page-fault on every forward by an amount that depends on what the process did before: a
    fresh process timed ResNet-20 at batch 64 at 28-44 ms, the same process after three training steps at
    19-21 ms (``benchmarks/allocator_latency.py``), and a pruned model's smaller activations escape more of
    it than its base's. Fixed thresholds make latency a property of the model, not of the process's
    history. Returns False where the C library is not glibc (nothing to fix there).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def repeat_ms(call: Callable[[], object], repeats: int, warmup: int) -> dict[str, float]:
    """Median and quartiles (ms) of ``repeats`` timed calls after ``warmup``: the one sequential timing loop
    (eager here, any runtime through ``timing.sequential``)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return _summary(times)


def _summary(times: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2]}


def _cuda_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """``repeat_ms`` with CUDA events: a host clock would time the kernel launches, not the kernels."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


@torch.no_grad()
def latency(model: nn.Module, example_input: torch.Tensor, *, repeats: int = 30, warmup: int = 5,
            threads: int | None = None) -> dict[str, float]:
    """Median (and quartiles) in milliseconds of ``repeats`` forward passes after ``warmup``."""
    dev = example_input.device
    steady_allocator()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with hooked(model):
            stats = _cuda_ms(model, example_input, repeats, warmup) if dev.type == "cuda" else \
                repeat_ms(lambda: model(example_input), repeats, warmup)
    finally:
        torch.set_num_threads(old_threads)
    return {**stats, "repeats": repeats, "threads": threads if threads is not None else old_threads,
            "device": str(dev)}


def measure(model: nn.Module, example_inputs: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
            repeats: int = 30, warmup: int = 5, threads: int | None = None, with_latency: bool = True) -> dict:
    """Params, MACs (per image), on-disk size and latency at each batch size in one dict."""
    if not isinstance(model, nn.Module) or not isinstance(example_inputs, torch.Tensor):
        raise PrunekitError("measure takes an nn.Module and a tensor batch shaped like the model's input")
    if example_inputs.is_meta or any(p.is_meta for p in model.parameters()):
        raise PrunekitError("the model or its inputs are on the meta device (no values): nothing to measure")
    one = example_inputs[:1]
    try:
        with hooked(model):
            model(one)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"the model does not run on an input of shape {tuple(one.shape)} ({msg}); pass inputs "
                            "shaped like the model's input") from exc
    stats: dict = {"params": count_params(model), "nonzero_params": count_params(model, nonzero=True),
                   "macs": count_macs(model, one), "size_bytes": size_bytes(model)}
    if with_latency:
        dev = next(model.parameters()).device
        stats["latency"] = {
            f"b{b}": latency(model, one.to(dev).expand(b, *one.shape[1:]).contiguous(), repeats=repeats,
                             warmup=warmup, threads=threads)
            for b in batch_sizes
        }
    return stats
