"""Export to ONNX (fp32, and int8 beside it) and measure what is deployed.

The exported graph is checked with ``onnx.checker`` and its outputs are compared with PyTorch's
before the file is kept, so a broken export never reaches deployment silently. An int8 model's
accuracy is measured by running the int8 file itself on the test split, never inferred from fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import PrunekitError
from .measure import hooked, steady_allocator
from .runtimes.ort import OnnxModule, session, to_onnx
from .runtimes.ort_int8 import DEFAULT_METHOD, float_nodes, quantize

TOLERANCE = 1e-4


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, out: str | Path, opset: int = 17) -> dict:
    """Write ``out`` as ONNX (opset >= 17), validated with onnx.checker and against ONNX Runtime."""
    import onnx

    if opset < 17:
        raise PrunekitError(f"opset {opset} is too old: use 17 or newer")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    x = torch.randn(2, *example_inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        to_onnx(model, x, tmp, opset)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        with hooked(model):
            ref = model(x).numpy()
        got = session(tmp).run(None, {"input": x.numpy()})[0]
        err = float(np.abs(ref - got).max())
        if err > TOLERANCE * max(1.0, float(np.abs(ref).max())):  # relative: detector boxes are in pixels
            raise PrunekitError(f"ONNX export differs from PyTorch by {err:.2e} (> {TOLERANCE} relative); "
                                "please report")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "opset": opset, "max_abs_diff": err, "bytes": out.stat().st_size}


def int8_path(fp32: Path) -> Path:
    """Where the int8 model of ``m.onnx`` lives: ``m.int8.onnx``, beside it."""
    return fp32.with_name(f"{fp32.stem}.int8.onnx")


def export_int8(model: nn.Module, calibration: Iterable[torch.Tensor], out: str | Path, *,
                method: str = DEFAULT_METHOD, opset: int = 17) -> dict:
    """``out`` as validated fp32 ONNX and ``int8_path(out)`` beside it: ONNX Runtime's static int8 quantisation
    calibrated on ``calibration`` (batches of the *training* split). The fp32 file is written first and kept
    when quantisation fails; the int8 file appears whole or not at all."""
    from . import tasks

    batches = [b.detach().cpu().float().numpy() for b in calibration]
    if not batches:
        raise PrunekitError("int8 calibration needs at least one batch of training data")
    out = Path(out)
    with tasks.for_model(model).export_mode(model):  # one output tensor
        info = export_onnx(model, torch.from_numpy(batches[0][:1]), out, opset=opset)
        keep = float_nodes(model, out)
    dst = int8_path(out)
    quantize(out, dst, batches, method=method, keep_float=keep)
    return {**info, "int8": {"path": str(dst), "bytes": dst.stat().st_size, "calibration_batches": len(batches),
                             "calibration_images": sum(len(b) for b in batches), "calibration_method": method,
                             "float_nodes": len(keep), "float_why": sorted(set(keep.values()))}}


def deploy_table(files: dict[str, tuple[nn.Module, Path]], data: Any, task: Any, *,
                 batch_sizes: Sequence[int] = (1, 64), threads: int = 2, rounds: int = 15) -> dict:
    """What each exported model gives where it is served: per name, the test metrics of its fp32 and its int8
    file (each file run itself, by ONNX Runtime) and their sizes; ``latency``: every file timed in one set of
    interleaved rounds at each batch size, ratios against the first name's fp32 file (the fp32 base)."""
    from .timing import interleaved

    cpu = torch.device("cpu")
    table: dict[str, Any] = {}
    paths = {}
    for name, (model, fp32) in files.items():
        table[name] = {"fp32": task.test_metrics(OnnxModule(fp32, model, threads), data, cpu),
                       "int8": task.test_metrics(OnnxModule(int8_path(fp32), model, threads), data, cpu),
                       "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8_path(fp32).stat().st_size}
        paths |= {f"{name}/fp32": fp32, f"{name}/int8": int8_path(fp32)}
    one = next(iter(data.calib))[0][:1].detach().cpu().float().numpy()
    steady_allocator()
    table["latency"] = {}
    for b in batch_sizes:
        feed = {"input": np.ascontiguousarray(np.broadcast_to(one, (b, *one.shape[1:])))}
        sessions = {k: session(p, threads, spinning=False) for k, p in paths.items()}
        res = interleaved({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}, rounds, 3)
        table["latency"][f"b{b}"] = {k: {"median_ms": v["median_ms"], "ratio": v["ratio"]} for k, v in res.items()}
    return table
