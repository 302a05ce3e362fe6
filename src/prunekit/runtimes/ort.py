"""ONNX Runtime, CPU execution provider, fp32: the export every deployment starts from."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PrunekitError
from ..measure import hooked
from .base import Runtime


def to_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int = 17) -> None:
    """Trace ``model`` on ``x`` to ``path`` with one input and one output, the batch axis dynamic."""
    with warnings.catch_warnings(), hooked(model):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          dynamo=False)


def session(path: Path, threads: int | None = None, spinning: bool = True) -> Any:
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


def export_for_timing(model: nn.Module, x: torch.Tensor, path: Path, name: str) -> None:
    """``to_onnx`` with a failure as one line naming the model (timing exports many models at once)."""
    try:
        to_onnx(model, x[:1], path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise PrunekitError(f"{name}: ONNX export for timing failed ({type(exc).__name__}: {first})") from exc


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime, shaped like the PyTorch model it was exported from.

    Evaluation code (the tasks' metrics, Ultralytics' validator) calls a module; this one runs the exported
    graph instead, so a metric of an ``.onnx`` file (int8 included) is measured on that file itself. ``like``
    lends the attributes evaluators read (a detector's class names, stride, head).
    """

    def __init__(self, path: str | Path, like: nn.Module | None = None, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = session(self.path, threads)
        for attr in ("names", "stride", "prunekit_arch", "yaml"):
            if like is not None and hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))
        self.head = [like.model[-1]] if like is not None and hasattr(like, "model") else []  # not a submodule

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.session.run(None, {"input": x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)

    def __deepcopy__(self, memo: dict) -> OnnxModule:
        return self  # a session holds no state a copy could protect; evaluators copy modules before fusing


class OnnxRuntime(Runtime):
    name, key, package, summary = "onnxruntime", "ort", "onnxruntime", "ONNX Runtime CPU, fp32"

    def prepare(self, model: nn.Module, x: torch.Tensor, threads: int, folder: Path,
                name: str) -> Callable[[], object]:
        path = folder / f"{name}.onnx"
        export_for_timing(model, x, path, name)
        sess = session(path, threads, spinning=False)
        feed = {"input": x.numpy().astype(np.float32)}
        return lambda: sess.run(None, feed)
