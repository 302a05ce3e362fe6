"""ONNX Runtime CPU, int8: static quantisation by ONNX Runtime's own quantiser.

QDQ format, per-channel int8 weights, uint8 activations whose ranges are calibrated on batches the
caller gives (the *training* split: the test split is never seen before the final table). Nodes a task
names (a detector's box decoding, where one scale cannot hold pixel coordinates and probabilities
together) stay in float. Timing a model in this runtime calibrates on a fixed random batch: the speed
of an int8 graph does not depend on its scale values, only on which nodes are quantised.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import PrunekitError
from .base import Runtime
from .ort import export_for_timing, session

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
# uint8 activations with int8 weights (U8S8): ONNX Runtime's fast x86 kernels (VPMADDUBSW / VNNI) take this pair;
# measured on ResNet-20, 2 threads, side by side with fp32: U8S8 2.3x faster at batch 1 and 64, S8S8 1.1x and 0.64x.
ACTIVATIONS = "uint8"


class _Reader:
    """ONNX Runtime's calibration-reader protocol over numpy batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self.it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.it, None)
        return None if x is None else {"input": np.ascontiguousarray(x, dtype=np.float32)}

    def rewind(self) -> None:  # entropy / percentile calibration read the data once; nothing to rewind to
        pass


def float_nodes(model: nn.Module, onnx_path: Path) -> dict[str, str]:
    """Nodes of ``onnx_path`` the model's task keeps in float, with why."""
    import onnx

    from .. import tasks

    return tasks.for_model(model).int8_float_nodes(model, onnx.load(str(onnx_path)).graph)


def quantize(fp32: Path, out: Path, batches: Iterable[np.ndarray], *, method: str = DEFAULT_METHOD,
             keep_float: Iterable[str] = ()) -> None:
    """Write ``out``, the static int8 quantisation of ``fp32`` calibrated on ``batches``; nothing on failure."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise PrunekitError(f"unknown calibration method {method!r}; allowed: {', '.join(CALIBRATION_METHODS)}")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                quantize_static(str(pre), tmp, _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8 if ACTIVATIONS == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=calib, nodes_to_exclude=list(keep_float),
                                extra_options={"CalibTensorRangeSymmetric": False})
            session(Path(tmp))  # a file ONNX Runtime cannot load is not an int8 model
            Path(tmp).replace(out)
        except PrunekitError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise PrunekitError(f"int8 quantisation of {fp32.name} failed ({type(exc).__name__}: {first})") from exc
        finally:
            Path(tmp).unlink(missing_ok=True)


class OnnxRuntimeInt8(Runtime):
    name, key, package, summary = "onnxruntime-int8", "ort-int8", "onnxruntime", "ONNX Runtime CPU, static int8"

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int, folder: Path,
                name: str) -> Callable[[], object]:
        fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
        if not fp32.exists():
            export_for_timing(model, x, fp32, name)
        if not int8.exists():  # quantised once per model: its other batch sizes run the same dynamic-batch file
            batch = np.random.default_rng(0).random((4, *x.shape[1:]), dtype=np.float32)
            quantize(fp32, int8, [batch], keep_float=float_nodes(model, fp32))
        sess = session(int8, threads, spinning=False)
        feed = {"input": x.numpy().astype(np.float32)}
        return lambda: sess.run(None, feed)
