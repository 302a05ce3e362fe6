"""Export to ONNX and time the model in ONNX Runtime.

The exported graph is checked with ``onnx.checker`` and its outputs are compared with PyTorch's
before the file is kept, so a broken export never reaches deployment silently.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PrunekitError
from .measure import hooked, steady_allocator

TOLERANCE = 1e-4


def _to_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), hooked(model):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          dynamo=False)


def _session(path: Path, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session; ``spinning=False`` for sessions timed side by side: a thread pool that keeps
    spinning after its run takes the cores from the next session's run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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
        _to_onnx(model, x, tmp, opset)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        with hooked(model):
            ref = model(x).numpy()
        got = _session(tmp).run(None, {"input": x.numpy()})[0]
        err = float(np.abs(ref - got).max())
        if err > TOLERANCE * max(1.0, float(np.abs(ref).max())):  # relative: detector boxes are in pixels
            raise PrunekitError(f"ONNX export differs from PyTorch by {err:.2e} (> {TOLERANCE} relative); "
                                "please report")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "opset": opset, "max_abs_diff": err, "bytes": out.stat().st_size}


def onnx_latency(model: nn.Module, example_inputs: torch.Tensor, *, batch_sizes=(1, 64), repeats: int = 30,
                 warmup: int = 5, threads: int | None = None) -> dict[str, dict[str, float]]:
    """Median ONNX Runtime latency (ms) per batch size, same protocol as ``measure.latency``."""
    steady_allocator()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        _to_onnx(model.cpu(), example_inputs[:1].cpu(), path, 17)
        sess = _session(path, threads)
        res = {}
        for b in batch_sizes:
            x = np.random.default_rng(0).standard_normal((b, *example_inputs.shape[1:])).astype(np.float32)
            for _ in range(warmup):
                sess.run(None, {"input": x})
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, {"input": x})
                times.append(1e3 * (time.perf_counter() - t0))
            res[f"b{b}"] = {"median_ms": statistics.median(times), "repeats": repeats,
                            "threads": threads or 0, "runtime": "onnxruntime-cpu"}
    return res
