"""``prunekit export``: a model file as ONNX (with ``--int8``, beside it the int8 model, both measured) or as
compressed sparse storage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .. import io, tasks
from ..errors import PrunekitError
from .inputs import _example_inputs


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PrunekitError(f"{out} already exists; use --force to overwrite or choose another --out")
    if args.gzip and args.format != "sparse":
        raise PrunekitError("--gzip compresses the sparse format only; ONNX files are written as they are")
    if args.int8:
        from ..export import int8_path

        if args.format != "onnx":
            raise PrunekitError("--int8 quantises an ONNX export: use --format onnx")
        if not args.data:
            raise PrunekitError("--int8 calibrates activation ranges on training batches: give --data")
        if int8_path(out).exists() and not args.force:
            raise PrunekitError(f"{int8_path(out)} already exists; use --force to overwrite or choose another --out")
        if out.suffix != ".onnx":
            raise PrunekitError(f"--out {out} must end in .onnx with --int8 (the int8 model is written beside it)")
    elif args.data or args.calibration_batches != 16 or args.calibration_method != "minmax":
        raise PrunekitError("--data and --calibration-* set up int8 calibration: add --int8")
    model = io.load(args.checkpoint)
    if args.format == "sparse":
        from ..sparse import export_sparse

        info = export_sparse(model, out, values=args.values, compress=args.gzip)
    elif args.int8:
        info = _export_int8(args, model, out)
    else:
        from ..export import export_onnx

        with tasks.for_model(model).export_mode(model):  # one output tensor
            info = export_onnx(model, _example_inputs(model, None)[:1], out, opset=args.opset)
    print(json.dumps(info))
    return 0


def _export_int8(args: argparse.Namespace, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """fp32 and int8 ONNX, calibrated on training batches of --data; both measured on its test split."""
    from ..export import deploy_table, export_int8, int8_path

    task = tasks.for_model(model)
    data = task.load_data(task.cli_data_spec(args, model), seed=0, split_seed=0, device=torch.device("cpu"))
    task.check_model(model, data, str(args.checkpoint))
    calibration = [batch[0] for batch in data.calib][: args.calibration_batches]
    info = export_int8(model, calibration, out, method=args.calibration_method, opset=args.opset)
    table = deploy_table({"model": (model, out)}, data, task, threads=args.threads, batch_sizes=task.latency_batches)
    row = table["model"]
    info["metrics"] = {"pytorch": task.test_metrics(model, data, torch.device("cpu")), "fp32_onnx": row["fp32"],
                       "int8": row["int8"]}
    info["speedup_int8_vs_fp32"] = {str(b): table["latency"][f"b{b}"]["model/int8"]["ratio"]
                                    for b in task.latency_batches}
    print(f"int8: {int8_path(out)} ({row['int8_bytes'] / 1e6:.2f} MB, fp32 {row['fp32_bytes'] / 1e6:.2f} MB); "
          f"{task.metric} on the test split: fp32 {row['fp32'][task.metric]:.2f}, int8 {row['int8'][task.metric]:.2f}",
          file=sys.stderr)
    return info
