"""Does the theoretical MACs speedup turn into measured speedup? And what does prunekit's wrapper cost?

Part 1: resnet56 pruned with l1-norm to 1.5x / 2x / 3x fewer MACs, once with the same ratio per layer
(local) and once with one global ranking and widths rounded to multiples of 8 (or 4); median latency at
batch 1 and 64 in PyTorch eager and ONNX Runtime on the CPU (threads fixed): measured / theoretical.
Part 2: wall time of ``prunekit.prune`` next to raw Torch-Pruning MetaPruner removing the same
channels count (same uniform ratio, same L1 group importance), median of repeats.

    python benchmarks/speedup.py --out benchmarks/results/speedup.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch_pruning as tp

import prunekit as pk
from prunekit.measure import measure
from prunekit.timing import sequential


def latency_table(args) -> list[dict]:
    torch.manual_seed(0)
    base = pk.models.create("resnet56").eval()
    x = torch.zeros(1, 3, 32, 32)
    b_eager = measure(base, x, repeats=args.repeats, threads=args.threads)
    b_onnx = sequential(base, x, repeats=args.repeats, threads=args.threads)
    rows = []
    for s, variant in ((s, v) for s in args.speedups for v in ("local", "global-rounded")):
        model = copy.deepcopy(base)
        if variant == "local":
            res, opts = pk.prune(model, "l1-norm", x, speedup=s), {}
        else:  # hardware-friendly widths: multiples of 8 (4 where 8 cannot land on the target)
            for r in (8, 4):
                try:
                    opts = {"ranking": "global", "round_to": r}
                    res = pk.prune(model, "l1-norm", x, speedup=s, **opts)
                    break
                except pk.PrunekitError:
                    model = copy.deepcopy(base)
        e = measure(model, x, repeats=args.repeats, threads=args.threads)
        o = sequential(model, x, repeats=args.repeats, threads=args.threads)
        row = {"target": s, "variant": variant, "options": opts, "theoretical": res.speedup, "params": e["params"],
               "macs": e["macs"]}
        for b in ("b1", "b64"):
            row[f"eager_{b}"] = b_eager["latency"][b]["median_ms"] / e["latency"][b]["median_ms"]
            row[f"onnx_{b}"] = b_onnx[b]["median_ms"] / o[b]["median_ms"]
            row[f"eager_{b}_ms"] = e["latency"][b]["median_ms"]
            row[f"onnx_{b}_ms"] = o[b]["median_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.insert(0, {"target": 1.0, "theoretical": 1.0, "params": b_eager["params"], "macs": b_eager["macs"],
                    "eager_b1_ms": b_eager["latency"]["b1"]["median_ms"],
                    "eager_b64_ms": b_eager["latency"]["b64"]["median_ms"],
                    "onnx_b1_ms": b_onnx["b1"]["median_ms"], "onnx_b64_ms": b_onnx["b64"]["median_ms"]})
    return rows


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ours(base: torch.nn.Module, x: torch.Tensor) -> None:
    pk.prune(copy.deepcopy(base), "l1-norm", x, speedup=2.0)


def _raw(base: torch.nn.Module, x: torch.Tensor, ratio: float) -> None:
    m = copy.deepcopy(base)
    head = [m.get_submodule(n) for n in ("linear", "fc") if hasattr(m, n)]
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
                                  pruning_ratio=ratio, ignored_layers=head)
    pruner.step()


def overhead_table(args) -> list[dict]:
    rows = []
    for name, shape in (("resnet56", (1, 3, 32, 32)), ("resnet110", (1, 3, 32, 32)),
                        ("tv:resnet50", (1, 3, 224, 224))):
        torch.manual_seed(0)
        base = pk.models.create(name).eval()
        x = torch.randn(*shape)
        probe = pk.prune(copy.deepcopy(base), "l1-norm", x, speedup=2.0)
        ratio = 1 - sum(a for _, a in probe.channels.values()) / sum(b for b, _ in probe.channels.values())

        copy_only = _time(partial(copy.deepcopy, base), args.prune_repeats)
        t_ours = _time(partial(_ours, base, x), args.prune_repeats)
        t_raw = _time(partial(_raw, base, x, ratio), args.prune_repeats)
        row = {"model": name, "prunekit_s": t_ours, "metapruner_s": t_raw, "deepcopy_s": copy_only,
               "overhead": (t_ours - copy_only) / (t_raw - copy_only), "speedup": probe.speedup}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[1.5, 2.0, 3.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--prune-repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/speedup.json")
    args = p.parse_args()
    result = {"latency": latency_table(args), "prune_time": overhead_table(args),
              "threads": args.threads, "torch": torch.__version__, "host": platform.node(),
              "cpu_count": torch.get_num_threads(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
