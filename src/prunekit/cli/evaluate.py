"""``prunekit eval``: accuracy (or the task's own evaluation), params, MACs, size and latency of a model file."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .. import io, tasks
from ..errors import PrunekitError
from ..graph import run_checked
from ..measure import measure
from ..tasks import Task
from ..timing import sequential
from ..train import evaluate
from .inputs import _example_inputs, _load_data


def _evaluate_payload(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    payload: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    bundle = _load_data(args) if args.data else None
    x = _example_inputs(model, bundle)[:1]
    run_checked(model, x, "checking the model against " + (f"data {bundle.name}" if bundle else "its input shape"))
    if bundle is not None:
        payload["top1"] = evaluate(model, bundle.eval_loader(bundle.test), "cpu")["top1"]
    stats = measure(model, x, repeats=args.repeats, threads=args.threads)
    payload.update(stats)
    if args.onnx:
        payload["onnx_latency"] = sequential(model, x, repeats=args.repeats, threads=args.threads)
    if args.base:
        base = io.load(args.base)
        bstats = measure(base, x, repeats=args.repeats, threads=args.threads)
        payload["theoretical_speedup"] = bstats["macs"] / payload["macs"]
        payload["measured_speedup"] = {b: bstats["latency"][b]["median_ms"] / payload["latency"][b]["median_ms"]
                                       for b in payload["latency"]}
        if args.onnx:
            bl = sequential(base, x, repeats=args.repeats, threads=args.threads)
            payload["onnx_measured_speedup"] = {b: bl[b]["median_ms"] / payload["onnx_latency"][b]["median_ms"]
                                                for b in bl}
    return payload


def _eval_task(args: argparse.Namespace, model: torch.nn.Module) -> Task:
    """``--task`` as given, or the task that owns the model; refuse a task the model cannot do."""
    task = tasks.for_model(model)
    if args.task and args.task != task.name:
        name = str((getattr(model, "prunekit_arch", None) or {}).get("name", type(model).__name__))
        raise PrunekitError(f"{args.checkpoint} holds '{name}', a model of task {task.name}: evaluate it with "
                            f"--task {task.name}")
    return task


def cmd_eval(args: argparse.Namespace) -> int:
    model = io.load(args.checkpoint)
    own = _eval_task(args, model).cli_eval  # a task with an evaluation of its own
    if own is not None:
        return own(args, model)
    if args.split != "test" or args.imgsz is not None:
        raise PrunekitError("--split and --imgsz apply to detectors (--task detect) only")
    payload = _evaluate_payload(args, model)
    if args.json:
        print(json.dumps(payload))
        return 0
    if "top1" in payload:
        print(f"top-1        {payload['top1']:.2f} %")
    print(f"params       {payload['params'] / 1e6:.4f} M")
    print(f"MACs         {payload['macs'] / 1e6:.2f} M")
    print(f"size         {payload['size_bytes'] / 1e6:.2f} MB")
    for b, lat in payload["latency"].items():
        print(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, {lat['threads']} threads, torch eager)")
    for b, lat in payload.get("onnx_latency", {}).items():
        print(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, onnxruntime)")
    if "theoretical_speedup" in payload:
        print(f"speedup      theoretical {payload['theoretical_speedup']:.2f}x, measured "
              + ", ".join(f"{b} {v:.2f}x" for b, v in payload["measured_speedup"].items()))
    return 0
