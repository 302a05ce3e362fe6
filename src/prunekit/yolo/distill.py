"""Distilling a pruned detector from its unpruned teacher through Ultralytics' own trainer and loss.

The loss of a distilled detector stage is Ultralytics' detection loss (box, class, DFL; unchanged, not
copied) plus α times a head-distillation term, on the same batches, the teacher in eval mode without
gradients. Over every anchor a of the head's raw outputs:

    KD = Σ_a w_a · [ Σ_c BCE(s_ca, σ(t_ca)) + T² · Σ_side KL(softmax(t_side,a / T) ‖ softmax(s_side,a / T)) ] / Σ_a w_a

where s, t are the student's and teacher's class logits and DFL box-distribution logits, σ is the sigmoid,
and w_a = max_c σ(t_ca) is the teacher's confidence at the anchor: anchors where the teacher sees an object
count, background anchors hardly at all. KD is a mean per weighted anchor and image; it is multiplied by
the batch size as Ultralytics' loss is. The criterion is installed after the trainer has set the model's
hyper-parameters and before training, and removed afterwards, so checkpoints never hold the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError


def raw_head(preds: Any) -> dict[str, torch.Tensor]:
    """The head's raw ``{"boxes", "scores"}`` from a training forward (a dict) or an eval one ((y, dict))."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    return preds.get("one2many", preds)


def head_kd(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The confidence-weighted class-score and box-distribution distillation term (module docstring)."""
    s_cls, t_cls = student["scores"].float(), teacher["scores"].float()
    s_box, t_box = student["boxes"].float(), teacher["boxes"].float()
    if s_cls.shape != t_cls.shape or s_box.shape != t_box.shape:
        raise PrunekitError(f"the teacher's head gives {tuple(t_cls.shape)} scores and {tuple(t_box.shape)} boxes, "
                            f"the student's {tuple(s_cls.shape)} and {tuple(s_box.shape)}: distil from a detector "
                            "of the same classes, strides and image size")
    t_prob = torch.sigmoid(t_cls)
    weight = t_prob.amax(1)  # (B, anchors): how sure the teacher is that something is there
    cls = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none").sum(1)
    b, c, a = s_box.shape
    ls = F.log_softmax(s_box.view(b, 4, c // 4, a) / temperature, 2)
    lt = F.log_softmax(t_box.view(b, 4, c // 4, a) / temperature, 2)
    box = (lt.exp() * (lt - ls)).sum((1, 2)) * temperature ** 2
    return ((cls + box) * weight).sum() / weight.sum().clamp_min(1e-6)


class HeadDistill:
    """A criterion for Ultralytics' trainer: its own detection loss plus α·KD·batch size."""

    def __init__(self, criterion: Any, teacher: nn.Module, alpha: float, temperature: float) -> None:
        self.criterion, self.teacher, self.alpha, self.temperature = criterion, teacher, alpha, temperature

    def __call__(self, preds: Any, batch: dict) -> tuple[torch.Tensor, Any]:
        loss, items = self.criterion(preds, batch)
        with torch.no_grad():
            self.teacher.eval()
            teacher = raw_head(self.teacher(batch["img"].to(next(self.teacher.parameters()).device)))
        student = raw_head(preds)
        kd = head_kd(student, {k: v.to(student["scores"].device) for k, v in teacher.items() if k != "feats"},
                     self.temperature)
        extra = (self.alpha * kd * student["scores"].shape[0]).reshape(1).to(loss.dtype)
        return torch.cat([loss.reshape(-1), extra]), items  # the trainer sums the parts: KD counted once

    def update(self) -> None:  # Ultralytics calls this on criteria that schedule their own weights
        if hasattr(self.criterion, "update"):
            self.criterion.update()
