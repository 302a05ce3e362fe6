"""A finished run's final table: test-split metrics and cost of the base and the result, their latency side by
side, and the export (fp32 ONNX, or int8 with each file's metric measured by running it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import timing
from ..measure import measure

LATENCY = {"threads": 1, "rounds": 10}  # the final table's side-by-side timing (eager PyTorch)


def cost_and_metrics(task: Any, model: torch.nn.Module, data: Any, x: torch.Tensor, dev: torch.device) -> dict:
    """The test split's metrics (the only use of the test split) and the model's cost."""
    stats = measure(model.cpu(), x[:1], with_latency=False)
    return {**task.test_metrics(model, data, dev), "params": stats["params"],
            "nonzero_params": stats["nonzero_params"], "macs": stats["macs"], "size_bytes": stats["size_bytes"]}


def add_latency(task: Any, x: torch.Tensor, before: torch.nn.Module, after: torch.nn.Module, metrics: dict) -> None:
    """Base and pruned model timed as ``compare`` times them: side by side in interleaved rounds at fixed
    threads, so a load burst hits both; the speedup is the median per-round ratio with its spread."""
    res = timing.side_by_side({"base": before.cpu(), "pruned": after.cpu()}, x[:1],
                              batch_sizes=task.latency_batches, runtimes=("eager",), mode=task.export_mode, **LATENCY)
    for b in task.latency_batches:
        row = res[f"eager_b{b}"]
        metrics["before"][f"latency_b{b}_ms"] = row["base"]["median_ms"]
        metrics["after"][f"latency_b{b}_ms"] = row["pruned"]["median_ms"]
        metrics["after"][f"speedup_b{b}"] = row["pruned"]["ratio"]
    metrics["latency"] = {"runtime": "eager", **LATENCY}


def add_export(st: dict, task: Any, data: Any, x: torch.Tensor, folder: Path, before: torch.nn.Module,
               after: torch.nn.Module, metrics: dict) -> None:
    """The final model (and the base, for its ratios) as ONNX in ``folder``; with ``int8``, beside it the int8
    model calibrated on training batches, each file's test metric measured by running it, and every file timed
    on ONNX Runtime against the fp32 base in one set of interleaved rounds."""
    from ..export import deploy_table, export_int8, export_onnx

    folder.mkdir(exist_ok=True)
    files = {"before": (before.cpu(), folder / "base.onnx"), "after": (after.cpu(), folder / "model.onnx")}
    if not st.get("int8"):
        for model, path in files.values():
            with task.export_mode(model):
                export_onnx(model, x[:1].cpu(), path, opset=st.get("opset", 17))
        metrics["export"] = {"onnx": str(files["after"][1])}
        return
    calib = [b[0] for b in data.calib][:st.get("calibration_batches", 16)]
    for model, path in files.values():
        export_int8(model, calib, path, method=st.get("calibration_method", "minmax"), opset=st.get("opset", 17))
    table = deploy_table(files, data, task, batch_sizes=task.latency_batches, threads=LATENCY["threads"],
                         rounds=LATENCY["rounds"])
    for side in ("before", "after"):
        row = metrics[side]
        row[f"int8_{task.metric}"] = table[side]["int8"][task.metric]
        row["int8_size_bytes"] = table[side]["int8_bytes"]
        for b in task.latency_batches:
            lat = table["latency"][f"b{b}"]
            row[f"int8_speedup_b{b}"] = lat[f"{side}/int8"]["ratio"]  # against the fp32 base, ONNX Runtime
            if side == "after":
                row[f"ort_speedup_b{b}"] = lat["after/fp32"]["ratio"]
    metrics["export"] = {"onnx": str(files["after"][1]), "int8": str(folder / "model.int8.onnx"),
                         "calibration_batches": len(calib), "int8_table": table}
