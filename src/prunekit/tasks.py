"""Tasks: what training, evaluation, measurement and reports need to know about a kind of model.

A task names its metric (and whether higher is better), computes the training loss and the
per-batch quantities the progress bar shows, and evaluates a model on batches. Classification is
here; detection (YOLO, mAP) plugs in as another ``Task`` without touching the loop in ``train``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .measure import hooked


@dataclass(frozen=True)
class Task:
    """Classification: cross-entropy (with label smoothing in training) and top-1 accuracy in %."""

    name: str = "classify"
    metric: str = "top1"
    metric_label: str = "top-1 (%)"
    higher_is_better: bool = True

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=label_smoothing)

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-batch count behind the training metric shown while training (correct predictions)."""
        return (out.argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """Top-1 accuracy and mean cross-entropy; sums across ranks under DDP; restores the model's mode."""
        correct = torch.zeros((), dtype=torch.float64, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        n = torch.zeros((), dtype=torch.float64, device=device)
        with hooked(model):
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    out = model(x)
                loss += F.cross_entropy(out.float(), y, reduction="sum").double()
                correct += (out.argmax(1) == y).sum()
                n += y.numel()
        if dist.is_initialized():
            for t in (correct, loss, n):
                dist.all_reduce(t)
        total = max(n.item(), 1.0)
        return {"top1": 100.0 * correct.item() / total, "loss": loss.item() / total, "n": int(n.item())}


CLASSIFICATION = Task()
# Detectors are trained and scored by Ultralytics (``prunekit.yolo``): the pipeline uses this task's
# names and direction; its loss and evaluation are Ultralytics' own.
DETECTION = Task(name="detect", metric="mAP50-95", metric_label="mAP50-95 (%)")
TASKS = {t.name: t for t in (CLASSIFICATION, DETECTION)}
