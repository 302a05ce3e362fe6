"""Latency targets: prune to a *measured* speedup on this machine's runtime, not to a MACs ratio.

MACs are not speed: the same MACs ratio runs 1.0-1.8x faster depending on the runtime and on
whether the kept widths are sizes its kernels like. A latency target therefore works from
measurements, in three parts:

1. ``table``: every conv/linear layer of the model timed standalone (``timing.side_by_side``, so
   warm-up, fixed threads and interleaved rounds as everywhere else) at the (out, in) widths pruning
   can give it: a coarse 2-D grid, plus every width (wide layers: every multiple of 8, or of a larger
   power of two, and its two neighbours) along each prunable axis with the other axis whole, so the
   widths the kernels like show up. Widths in between are interpolated (bilinear on the grid,
   corrected per axis by the fine sweeps). What the layers do not explain (BatchNorm, activations,
   additions, overhead) is the end-to-end time minus the layers' sum, scaled with the layers' output
   activations. The table is built once per model architecture, runtime, batch, threads and machine
   and cached on disk.
2. ``active``: while a table is active, ``PruneGraph.macs`` counts a keep decision in predicted
   latency (expressed in MACs of the unpruned model), so every budget a method computes from MACs
   (the bisections in ``thresholds``, auto-mend's search space, imp-sim's greedy) becomes a latency
   budget without any change to the method, and ``thresholds`` snaps each group's width up to the
   widest one nearby that the table predicts to be no slower.
3. ``prunekit.prune(..., latency=...)`` prunes copies to the table's prediction, measures each end to
   end against the unpruned model (``measure``) and corrects the asked prediction until the measured
   speedup lands.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import io, runtimes, tasks, timing
from .data._folder import cache_key, default_cache_dir
from .errors import PrunekitError
from .graph import _PRODUCTS, PruneGraph
from .measure import LAYERS, hooked

SCHEMA = 2  # 2: ONNX Runtime timed without spinning thread pools
ROUNDS = 3  # interleaved rounds per table point: a table is many points, each needs only a rough median
MODEL_ROUNDS = 5  # rounds of the end-to-end time that the layers' sum is compared with
MEASURE_ROUNDS = 15  # rounds of a pruned model against the unpruned one (what a target is judged by)
COARSE = (0.0, 0.25, 0.5, 0.75, 1.0)  # the 2-D grid per prunable axis, as fractions of its width (0: one unit)
EVERY_WIDTH = 32  # an axis of at most this many width units is timed at every width
SWEEP_POINTS = 16  # a wider one at each multiple of a power of two >= 8 (at most this many), and its neighbours
SNAP_WINDOW = 8  # channels a group may grow by to land on a width the table predicts no slower


def check_setting(runtime: Any, batch: Any, threads: Any) -> None:
    """One PrunekitError for a runtime that is unknown or not installed, or a batch or thread count < 1."""
    runtimes.get(runtime)
    for name, value in (("batch", batch), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrunekitError(f"{name} must be a positive integer, got {value!r}")


def machine(runtime: str) -> dict[str, Any]:
    """What decides a timing besides the model: CPU model and count, torch and the runtime's version."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": runtimes.RUNTIMES[runtime].version()}


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself if it lives on the CPU, else a CPU copy (timing moves what it times to the CPU)."""
    return model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()


def measure(base: nn.Module, pruned: nn.Module, example_inputs: torch.Tensor, *, runtime: str = "eager",
            batch: int = 64, threads: int = 2, rounds: int = MEASURE_ROUNDS) -> dict[str, Any]:
    """Measured speedup of ``pruned`` over ``base``: median and interquartile spread of per-round ratios."""
    x = example_inputs[:1].detach().cpu().float()
    res = timing.side_by_side({"base": _on_cpu(base), "pruned": _on_cpu(pruned)}, x, batch_sizes=(batch,),
                              runtimes=(runtime,), threads=threads, rounds=rounds,
                              mode=tasks.for_model(base).export_mode)  # a detector: its single-output forward
    (row,) = res.values()
    r = row["pruned"]["ratio"]
    return {"speedup": r["median"], "lo": r["lo"], "hi": r["hi"], "within_noise": r["within_noise"],
            "base_ms": row["base"]["median_ms"], "pruned_ms": row["pruned"]["median_ms"]}


# ---- the table ----
class _Layer:
    """One layer shape's measured times and the interpolation between them."""

    def __init__(self, sig: dict):
        self.sig = sig
        self.full_o, self.full_i = sig["full"]
        self.t = {(o, i): ms for o, i, ms in sig["points"]}
        self.memo: dict[tuple[int, int], float] = {}

    def ms(self, o: int, i: int) -> float:
        key = (o, i)
        if key not in self.memo:
            self.memo[key] = self._ms(o, i)
        return self.memo[key]

    def _ms(self, o: int, i: int) -> float:
        s = self.sig
        if s["kind"] == "fixed":  # a shape no replica can take: MACs-proportional from its full width
            return self.t[(self.full_o, self.full_i)] * (o * i) / (self.full_o * self.full_i)
        if s["kind"] == "diag":  # depthwise: out, in and groups move together
            return float(np.interp(o, s["fine_o"], [self.t[(w, w)] for w in s["fine_o"]]))
        t = self._grid(o, i)
        if len(s["fine_o"]) > 1:
            t *= float(np.interp(o, s["fine_o"], [self.t[(w, self.full_i)] for w in s["fine_o"]])) / \
                self._grid(o, self.full_i)
        if len(s["fine_i"]) > 1:
            t *= float(np.interp(i, s["fine_i"], [self.t[(self.full_o, w)] for w in s["fine_i"]])) / \
                self._grid(self.full_o, i)
        return t

    def _grid(self, o: int, i: int) -> float:
        co, ci = self.sig["coarse_o"], self.sig["coarse_i"]
        rows = [float(np.interp(o, co, [self.t[(x, y)] for x in co])) for y in ci]
        return float(np.interp(i, ci, rows))


class LatencyTable:
    """A model's per-layer latency table on one runtime, batch, thread count and machine.

    ``predict_ms(widths)`` predicts the model's latency for per-layer widths ``{name: [out, in, groups]}``
    (``PruneGraph.widths``); ``macs`` and ``snap`` are what ``PruneGraph`` and ``thresholds`` call while the
    table is ``active``.
    """

    def __init__(self, data: dict, path: Path | None = None, cached: bool = False):
        self.data, self.path, self.cached = data, path, cached
        self.sigs = [_Layer(s) for s in data["signatures"]]
        self.layers = data["layers"]
        self.rest_ms = data["rest_ms"]
        full = {n: [s.full_o, s.full_i, 1] for n, lay in self.layers.items() for s in [self.sigs[lay["sig"]]]}
        self.full_act = max(1, self._activations(full))
        self.full_ms = self.predict_ms(full)

    @property
    def info(self) -> dict[str, Any]:
        """Where the table lives and what it cost, for a PruneResult."""
        d = self.data
        return {"path": str(self.path) if self.path else None, "cached": self.cached, **d["setting"],
                "points": sum(len(s["points"]) for s in d["signatures"]), "build_seconds": d["build_seconds"],
                "model_ms": d["model_ms"], "predicted_ms": self.full_ms}

    def _activations(self, widths: dict[str, list[int]]) -> int:
        return sum(w[0] * self.layers[n]["positions"] for n, w in widths.items() if n in self.layers)

    def predict_ms(self, widths: dict[str, list[int]]) -> float:
        """Predicted latency: the layers' table times plus the rest, scaled with their output activations."""
        layers = sum(self.sigs[self.layers[n]["sig"]].ms(w[0], w[1]) for n, w in widths.items() if n in self.layers)
        return layers + self.rest_ms * self._activations(widths) / self.full_act

    def macs(self, pg: PruneGraph, widths: dict[str, list[int]]) -> int:
        """The graph's cost hook: predicted latency in MACs of the unpruned model (``base_macs`` at full widths)."""
        return round(pg.base_macs * self.predict_ms(widths) / self.full_ms)

    def _group_ms(self, widths: dict[str, list[int]], names: list[str]) -> float:
        part = {n: widths[n] for n in names}
        return self.predict_ms(part)

    def snap(self, pg: PruneGraph, keep: dict[int, int]) -> dict[int, int]:
        """``keep`` with each group widened to the widest width within ``SNAP_WINDOW`` channels that the
        table predicts no slower (widths the kernels pad to cost nothing more: keep those channels)."""
        keep = dict(keep)
        for gi, k in list(keep.items()):
            g = pg.groups[gi]
            step = g.chunks * (pg.round_to or 1)
            wider = sorted({pg.clamp_keep(g, k + j * step) for j in range(1, max(1, SNAP_WINDOW // step) + 1)} - {k})
            names = list(dict.fromkeys(n for n, _, _ in g.members if n in self.layers))
            if not wider or not names:
                continue
            now = self._group_ms(pg.widths(keep), names)
            fits = [c for c in wider if self._group_ms(pg.widths(keep | {gi: c}), names) <= now]
            if fits:
                keep[gi] = fits[-1]
        return keep


def table(model: nn.Module, example_inputs: torch.Tensor, *, runtime: str = "eager", batch: int = 64,
          threads: int = 2, cache_dir: str | Path | None = None, progress: bool = True) -> LatencyTable:
    """``model``'s latency table on this machine: from the cache, else timed now (minutes) and cached.

    The cache key is the architecture (the model's module tree, which holds every layer's shape, and the
    input shape), the runtime, batch, threads and the machine (``machine``); a broken cache file is rebuilt.
    """
    check_setting(runtime, batch, threads)
    x = example_inputs[:1].detach().cpu().float()
    ref = copy.deepcopy(model).cpu()
    key = cache_key("latency-table", SCHEMA, repr(ref), tuple(x.shape[1:]), runtime, batch, threads, machine(runtime))
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latency"
    path = path / f"{type(ref).__name__}-{key[:16]}.json"
    if path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            if data.get("schema") == SCHEMA:
                return LatencyTable(data, path, cached=True)
    data = _build(ref, x, runtime, batch, threads, progress)
    io.atomic_write_text(json.dumps(data), path)
    return LatencyTable(data, path, cached=False)


def _axis(full: int, unit: int) -> tuple[list[int], list[int]]:
    """(coarse, fine) widths of one prunable axis: multiples of ``unit`` up to ``full``."""
    n = full // unit
    coarse = {max(1, round(n * f)) for f in COARSE}
    if n <= EVERY_WIDTH:
        fine = set(range(1, n + 1))
    else:
        step = max(8, 1 << math.ceil(math.log2(n / SWEEP_POINTS)))  # kernels block channels by 8 or more
        fine = {w for p in range(step, n + 1, step) for w in (p - 1, p, p + 1) if 1 <= w <= n} | {n}
    return sorted(c * unit for c in coarse), sorted(w * unit for w in fine | coarse)


def _signature(m: nn.Module, in_shape: list[int], axes: set[str]) -> dict:
    """What decides a layer's time besides its widths, and the widths it is timed at."""
    cls = next(c for c in LAYERS if isinstance(m, c))
    linear = cls is nn.Linear
    o, i = (m.out_features, m.in_features) if linear else (m.out_channels, m.in_channels)
    groups = 1 if linear else m.groups
    depthwise = groups > 1 and groups == i
    sig = {"cls": cls.__name__, "in_shape": in_shape, "full": [o, i], "bias": m.bias is not None,
           "groups": groups, "conv": None if linear else
           [list(m.kernel_size), list(m.stride), m.padding if isinstance(m.padding, str) else list(m.padding),
            list(m.dilation), list(m.output_padding) if m.transposed else [], m.padding_mode]}
    if "w" in axes and not (depthwise and o == i):
        axes = set()  # a grouped shape pruning moves in a way no fixed-groups replica can take
        sig["kind"] = "fixed"
    unit = groups if groups > 1 and not depthwise else 1
    co, fo = _axis(o, unit) if "o" in axes or "w" in axes else ([o], [o])
    ci, fi = _axis(i, unit) if "i" in axes else ([i], [i])
    if "w" in axes:
        sig |= {"kind": "diag", "coarse_o": fo, "coarse_i": fo, "fine_o": fo, "fine_i": fo,
                "todo": [(w, w) for w in fo]}
    else:
        sig.setdefault("kind", "grid")
        todo = {(a, b) for a in co for b in ci} | {(a, i) for a in fo} | {(o, b) for b in fi}
        sig |= {"coarse_o": co, "coarse_i": ci, "fine_o": fo, "fine_i": fi, "todo": sorted(todo)}
    return sig


def _replica(sig: dict, o: int, i: int) -> nn.Module:
    """A fresh layer of ``sig``'s kind with ``o`` outputs and ``i`` inputs."""
    cls = getattr(nn, sig["cls"])
    if cls is nn.Linear:
        return nn.Linear(i, o, bias=sig["bias"])
    kernel, stride, padding, dilation, output_padding, padding_mode = sig["conv"]
    groups = i if sig["kind"] == "diag" else sig["groups"]
    kw = {"output_padding": output_padding} if output_padding else {}  # transposed convolutions only
    return cls(i, o, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=sig["bias"],
               padding_mode=padding_mode, **kw)


def _input(sig: dict, i: int) -> torch.Tensor:
    shape = list(sig["in_shape"])
    shape[-1 if sig["cls"] == "Linear" else 0] = i
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def _time(sig: dict, runtime: str, batch: int, threads: int, bar: tqdm) -> list[list]:
    """[o, i, median ms] of every width pair ``sig`` is timed at; pairs sharing an input width share a run."""
    by_in: dict[int, list[int]] = {}
    for o, i in sig["todo"]:
        by_in.setdefault(i, []).append(o)
    points = []
    with torch.no_grad():
        for i, outs in by_in.items():
            models = {f"o{o}": _replica(sig, o, i) for o in outs}
            (row,) = timing.side_by_side(models, _input(sig, i), batch_sizes=(batch,), runtimes=(runtime,),
                                         threads=threads, rounds=ROUNDS, warmup=1).values()
            points += [[o, i, row[f"o{o}"]["median_ms"]] for o in outs]
            bar.update(len(outs))
    return points


def _build(ref: nn.Module, x: torch.Tensor, runtime: str, batch: int, threads: int, progress: bool) -> dict:
    """Time the whole model (first: a model the runtime cannot run fails here, at once), then every layer shape."""
    t0 = time.perf_counter()
    try:
        (row,) = timing.side_by_side({"model": ref}, x, batch_sizes=(batch,), runtimes=(runtime,), threads=threads,
                                     rounds=MODEL_ROUNDS, mode=tasks.for_model(ref).export_mode).values()
    except PrunekitError as exc:
        raise PrunekitError(f"runtime {runtime} cannot run this model, so no latency target on it ({exc})") from exc
    model_ms = row["model"]["median_ms"]
    pg = PruneGraph(ref, x)
    axes: dict[str, set[str]] = {}
    for g in pg.groups:
        for name, kind, _ in g.members:
            if kind in ("out", "in", "dw"):
                axes.setdefault(name, set()).add({"out": "o", "in": "i", "dw": "w"}[kind])
    mods = {n: ref.get_submodule(n) for n in pg.unit if not n.endswith(_PRODUCTS)}
    mods = {n: m for n, m in mods.items() if isinstance(m, LAYERS)}
    seen: dict[nn.Module, tuple[list[int], int]] = {}

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if m not in seen and isinstance(out, torch.Tensor):
            positions = out.numel() // (out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1])
            seen[m] = (list(inp[0].shape[1:]), positions)

    with hooked(ref, [(m, hook) for m in mods.values()]):
        ref(x)
    sigs: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    for name, m in mods.items():
        if m not in seen:
            continue
        in_shape, positions = seen[m]
        sig = _signature(m, in_shape, axes.get(name, set()))
        k = json.dumps({key: v for key, v in sig.items() if key != "todo"}, sort_keys=True)
        sigs.setdefault(k, sig)
        layers[name] = {"sig": list(sigs).index(k), "positions": positions}
    desc = f"latency table ({runtime}, batch {batch}, {threads} threads)"
    with tqdm(total=sum(len(s["todo"]) for s in sigs.values()), desc=desc, disable=not progress or None,
              leave=False) as bar:
        for sig in sigs.values():
            sig["points"] = _time(sig, runtime, batch, threads, bar)
            del sig["todo"]
    data = {"schema": SCHEMA, "setting": {"runtime": runtime, "batch": batch, "threads": threads},
            "machine": machine(runtime), "model": type(ref).__name__, "model_ms": model_ms, "rest_ms": 0.0,
            "layers": layers, "signatures": list(sigs.values()), "build_seconds": 0.0}
    # What the layers do not explain (norms, activations, additions, overhead): end to end minus their sum.
    data["rest_ms"] = max(0.0, model_ms - LatencyTable(data).full_ms)
    data["build_seconds"] = time.perf_counter() - t0
    return data
