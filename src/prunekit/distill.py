"""Distillation from the unpruned model: recover what pruning cost by training towards the teacher's outputs.

Fine-tuning a pruned network on labels alone throws away what the unpruned network knew about every
wrong class (Hinton et al. 2015); pruning papers and toolkits distil from the unpruned model because
it is free: the teacher is the model the user already has. A training stage with
``distill: {teacher: base | before | PATH, alpha, temperature}`` (classification) minimises

    α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)

with the teacher in eval mode and without gradients on the same batches. T² keeps the soft term's
gradient on the scale of the hard one as T grows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError
from .measure import hooked

KEYS = ("teacher", "alpha", "temperature")
TEACHERS = ("base", "before")  # the run's model before any sparsity training / just before the last prune
DEFAULTS = {"alpha": 0.5, "temperature": 4.0}


def check(spec: Any, where: str = "distill") -> dict[str, Any]:
    """A stage's ``distill`` settings with defaults filled in, or one error naming the key."""
    if not isinstance(spec, dict):
        raise PrunekitError(f"{where} must be a mapping {{teacher: base | before | PATH, alpha, temperature}}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise PrunekitError(f"{where}.{str(unknown[0])[:40]}: unknown key; allowed: {', '.join(KEYS)}")
    teacher = spec.get("teacher")
    if not isinstance(teacher, str) or not teacher:
        raise PrunekitError(f"{where}.teacher: give base, before or the path of a prunekit model file")
    out = {**DEFAULTS, **spec}
    alpha, temperature = out["alpha"], out["temperature"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise PrunekitError(f"{where}.alpha must be a number in [0, 1], got {str(alpha)[:40]}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise PrunekitError(f"{where}.temperature must be a finite number > 0, got {str(temperature)[:40]}")
    return {"teacher": teacher, "alpha": float(alpha), "temperature": float(temperature)}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·hard, the KL averaged over the batch."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1), log_target=True,
                    reduction="batchmean")
    return alpha * t * t * soft + (1 - alpha) * hard


class Distiller:
    """``fit``'s ``distill`` hook: (inputs, student outputs, hard loss) -> the distillation objective."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        for p in teacher.parameters():
            p.requires_grad_(False)

    def check_against(self, student: nn.Module, example_inputs: torch.Tensor, where: str = "distill") -> None:
        """The teacher must answer the student's inputs with outputs of the student's shape."""
        x = example_inputs[:2]
        try:
            with hooked(self.teacher), hooked(student):
                t, s = self.teacher(x.to(next(self.teacher.parameters()).device)), student(x)
        except Exception as exc:
            raise PrunekitError(f"{where}.teacher does not run on the student's inputs "
                                f"({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
        if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor) or t.shape != s.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PrunekitError(f"{where}.teacher answers with {shape}, the student with "
                                f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}: another "
                                "architecture family or class count; distil from a model of the same task")

    def to(self, device: torch.device) -> Distiller:
        self.teacher.to(device).eval()
        return self

    def __call__(self, x: torch.Tensor, out: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.eval()
            teacher = self.teacher(x)
        return kd_loss(out, teacher, hard, self.alpha, self.temperature)
