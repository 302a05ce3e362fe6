"""Do latency targets land where MACs targets miss? (issue 25)

For each runtime and asked speedup, the same model is pruned twice with the same method: once to a MACs
ratio (``speedup=``) and once to a measured speedup (``latency=``), and both are timed side by side
against the unpruned model (``prunekit.latency.measure``: warm-up, fixed threads, interleaved rounds,
median and interquartile spread). The goal: latency targets measure >= 0.95 x asked everywhere. Also
recorded: how long building the model's latency table took (goal: <= 3 min for resnet56 per runtime),
and, when Ultralytics is installed, yolov8n at 320 on ONNX Runtime, batch 1, asked 2x.

Run it on a quiet machine (nothing else running; the timings are the result):

    python benchmarks/latency_targets.py --out benchmarks/results/latency-targets.json

Quick check that it runs (minutes; numbers meaningless):

    python benchmarks/latency_targets.py --model resnet20 --batch 8 --targets 1.5 --no-yolo --fresh \\
        --out /tmp/latency-targets.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunekit as pk
from prunekit import latency, timing


def _case(name: str, base: torch.nn.Module, x: torch.Tensor, method: str, asked: float, runtime: str, batch: int,
          threads: int) -> dict:
    """One model x runtime x asked speedup: the MACs-targeted and the latency-targeted prune, both measured."""
    setting = {"runtime": runtime, "batch": batch, "threads": threads}
    row: dict = {"model": name, "method": method, "asked": asked, **setting}
    macs = copy.deepcopy(base)
    res = pk.prune(macs, method, x, speedup=asked)
    got = latency.measure(base, macs, x, **setting)
    row["macs_target"] = {"macs_ratio": res.speedup, **got, "of_asked": got["speedup"] / asked}
    t0 = time.perf_counter()
    table = latency.table(base, x, **setting)  # built here (timed) or cached; the prune below reads it
    row["table"] = table.info
    fast = copy.deepcopy(base)
    t1 = time.perf_counter()
    try:
        res = pk.prune(fast, method, x, latency=asked, **setting)
    except pk.PrunekitError as exc:
        row["latency_target"] = {"error": str(exc), "closest": getattr(exc, "closest", None),
                                 "wall_s": time.perf_counter() - t1}
        return row
    again = latency.measure(base, fast, x, **setting)  # an independent measurement of the result
    row["latency_target"] = {"macs_ratio": res.speedup, **again, "of_asked": again["speedup"] / asked,
                             "search": {k: v for k, v in res.measured.items() if k != "table"},
                             "wall_s": time.perf_counter() - t1, "with_table_s": time.perf_counter() - t0}
    return row


def _line(row: dict) -> str:
    m, lat = row["macs_target"], row["latency_target"]
    tail = (f"{lat['speedup']:.2f}x ({lat['lo']:.2f}-{lat['hi']:.2f}) = {lat['of_asked']:.2f} of asked"
            if "error" not in lat else f"error: {lat['error']}")
    return (f"| {row['model']} | {row['runtime']} | {row['batch']} | {row['asked']:g}x | "
            f"{m['speedup']:.2f}x ({m['lo']:.2f}-{m['hi']:.2f}) = {m['of_asked']:.2f} | {tail} | "
            f"{row['table']['build_seconds']:.0f}s{' (cached)' if row['table']['cached'] else ''} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56", help="zoo model on CIFAR-shaped input")
    ap.add_argument("--method", default="l1-norm")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--runtimes", nargs="+", default=list(timing.RUNTIMES), choices=timing.RUNTIMES)
    ap.add_argument("--no-yolo", action="store_true", help="skip yolov8n even if Ultralytics is installed")
    ap.add_argument("--fresh", action="store_true", help="build tables in a temporary folder (time the build)")
    ap.add_argument("--out", default="benchmarks/results/latency-targets.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh:
            os.environ["PRUNEKIT_CACHE"] = tmp
        base = pk.models.create(args.model, num_classes=10).eval()
        x = torch.randn(8, 3, 32, 32)
        rows = [_case(args.model, base, x, args.method, t, rt, args.batch, args.threads)
                for rt in args.runtimes for t in args.targets]
        for r in rows:
            print(_line(r), flush=True)
        if not args.no_yolo and importlib.util.find_spec("ultralytics") is not None:  # optional extra; prunekit
            # imports it itself (offline), so it is only looked for here
            det = pk.models.create("ul:yolov8n", num_classes=80, imgsz=320).eval()
            rows.append(_case("ul:yolov8n@320", det, torch.rand(1, 3, 320, 320), args.method, 2.0, "onnxruntime", 1,
                              args.threads))
            print(_line(rows[-1]), flush=True)
    out = {"command": "python " + shlex.join(sys.argv), "machine": latency.machine("onnxruntime"),
           "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| model | runtime | batch | asked | MACs target: measured | latency target: measured | table |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
