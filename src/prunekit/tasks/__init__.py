"""Tasks: everything that differs between kinds of model, behind one contract.

The pipeline, CLI, report and methods ask the run's task and never branch on which task it is (as
Ultralytics' task map gives each task its model, trainer and validator). A task provides:

- its metric (name, label with unit, direction) and ``evaluate(model, batches, device)`` on
  ``(inputs, targets)`` batches, with which methods score their decisions; ``loss`` for methods that
  need a gradient (``hits``: what the progress bar counts);
- its data: ``load_data`` gives the splits (train, a held-out val for selection, test for the final
  table only), calibration batches and example inputs;
- its models: which it owns (``owns``, ``owns_name``), how one is created and checked against the data;
- its training stages (``train_stage``: prunekit's ``fit``, or Ultralytics' trainer) and the keys they take;
- its final table (``score``, ``test_metrics``), the mode its models are timed and exported in, and what
  the report adds (rows, figures);
- its CLI commands on a model file (``cli_*``).

Classification (``prunekit.tasks.classify``) and detection (``prunekit.yolo.task``) are the two entries of
``TASKS``; a task is imported when first asked for, so an optional extra's task costs nothing until
used. Adding a task is one module with a ``TASK`` object and one line in ``TASKS``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError

TASKS = {"classify": "prunekit.tasks.classify", "detect": "prunekit.yolo.task"}  # name -> module holding TASK
DEFAULT = "classify"  # the task of any model no other task claims


@dataclass
class TaskData:
    """A run's data as its task reads it: each split in the form the task's own functions take."""

    train: Any  # what training stages read (a loader, a data yaml)
    val: Any  # held out of the training data: selection, method scoring, cycle stops
    test: Any  # the final table only
    calib: Any  # calibration batches of the training split, in a fixed order
    x: torch.Tensor  # example inputs (a batch of real training inputs)
    sizes: dict[str, int]  # images per split, for metrics.json
    record: dict  # what split.json records (checked again on resume)
    batch_size: int  # training batch size unless a stage sets its own
    source: Any = None  # the task's own handle on the data set
    info: dict = field(default_factory=dict)  # extra metrics.json keys (e.g. the data yaml a report reads)
    files: dict[str, Path] = field(default_factory=dict)  # files the run folder keeps a copy of (made split lists)


@dataclass
class Aids:
    """What a pipeline wraps around any task's trainer, written once: the method's sparsity regulariser (a hook
    after each backward pass), the masks that keep an unstructured prune's zeros at zero, and the teacher of
    a distilled stage (``(model, distill settings)``; each task builds its own loss from it)."""

    regularizer: Callable[[nn.Module, int], Any] | None = None
    keep_zeros: bool = False
    teacher: tuple[nn.Module, dict] | None = None

    def hook(self, model: nn.Module, steps: int) -> Any:
        """The regulariser's hook for a stage of ``steps`` optimiser steps, or None."""
        return self.regularizer(model, max(1, steps)) if self.regularizer is not None else None

    @contextlib.contextmanager
    def zeros_kept(self, model: nn.Module) -> Iterator[Any]:
        """Inside, no gradient reaches a zero of ``model`` (so no optimiser step or EMA revives it); yields the
        masks (None when zeros need not stay), detached on the way out."""
        from ..masks import Masks

        masks = Masks.from_zeros(model) if self.keep_zeros else None
        if masks is not None:
            masks.attach(model)
        try:
            yield masks
        finally:
            if masks is not None:
                masks.detach()


class Task:
    """The contract; every method here is one a task must provide (or inherit where a default fits)."""

    name: str = ""
    metric: str = ""
    metric_label: str = ""  # with its unit, e.g. "top-1 (%)"
    higher_is_better: bool = True
    data_hint: str = ""  # what data.name may be, for the error when it is missing
    train_keys: frozenset[str] = frozenset()  # keys a training stage takes (besides stage, distill, regulariser)
    train_keys_hint: str = ""  # said with an unknown training-stage key (where the task's settings go)
    default_batch: int = 128
    report_rows: tuple[tuple[str, str, str], ...] = ()  # (label, metrics key, format) beside the metric
    metric_format: str = "{:.2f}"
    fractional_epochs: bool = False  # its trainer can stop inside an epoch (a budget of 0.25 epochs)
    latency_batches: tuple[int, ...] = (1, 64)  # batch sizes the final table times

    # ---- models ----
    def owns_name(self, name: str) -> bool:
        """Whether a model name (``model.name`` of a config) is one of this task's."""
        return False

    def owns(self, model: nn.Module) -> bool:
        """Whether a loaded model is one of this task's (by the recipe ``prunekit.save`` records)."""
        return False

    def create_model(self, spec: dict, data: TaskData, seed: int) -> nn.Module:
        raise NotImplementedError

    def check_model(self, model: nn.Module, data: TaskData, source: str) -> None:
        """Refuse a model that cannot run on ``data`` (another task, other classes) with one line."""
        raise NotImplementedError

    @contextlib.contextmanager
    def export_mode(self, model: nn.Module) -> Iterator[nn.Module]:
        """The mode the model is timed and exported in (one output tensor where the eval forward gives more)."""
        yield model

    def int8_float_nodes(self, model: nn.Module, graph: Any) -> dict[str, str]:
        """Nodes of the model's ONNX ``graph`` that int8 quantisation must leave in float, each with why."""
        return {}

    # ---- data and metric ----
    def load_data(self, spec: dict, *, seed: int, split_seed: int, device: torch.device) -> TaskData:
        raise NotImplementedError

    def loss(self, out: Any, y: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        raise PrunekitError(f"the {self.name} task has no loss for prunekit's own training loop; use a method "
                            "that needs no gradient")

    def hits(self, out: Any, y: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def score(self, model: nn.Module, data: TaskData, split: str, device: torch.device) -> float:
        """The metric on ``data``'s split ``val`` or ``test``."""
        raise NotImplementedError

    def test_metrics(self, model: nn.Module, data: TaskData, device: torch.device) -> dict[str, float]:
        """What the final table shows of the test split (the only use of it)."""
        return {self.metric: self.score(model, data, "test", device)}

    # ---- training stages ----
    def check_stage(self, stage: dict, where: str) -> None:
        """Check a training stage's own settings; raise ``errors.config_error`` naming the key."""

    def stage_epochs(self, stage: dict) -> int | str:
        """A stage's epochs as written (an integer or ``rest``), with the task's default."""
        raise NotImplementedError

    def train_stage(self, model: nn.Module, stage: dict, data: TaskData, *, kind: str, epochs: int, sdir: Path,
                    aids: Aids, seed: int, device: torch.device, log: Path,
                    desc: str) -> tuple[nn.Module, float | None]:
        """Train ``model`` for ``epochs`` (resuming in ``sdir``) with ``aids`` around the task's trainer;
        returns it and the metric of what it keeps."""
        raise NotImplementedError

    def report_figures(self, run: dict) -> list[tuple[str, bytes | None, str | None]]:
        """(name, PNG or None, why not) of the task's own report figures for a run."""
        return []

    # ---- the CLI on a model file: a task with data or training of its own gives these; the CLI's own path
    # (prunekit's data sets and ``fit``) serves where they are None ----
    def cli_data_spec(self, args: Any, model: nn.Module) -> dict:
        """``--data`` and the flags beside it as the spec ``load_data`` reads (``prunekit export --int8``)."""
        raise NotImplementedError

    cli_calibration: Callable[[str, nn.Module, int], tuple[Any, Any, torch.Tensor]] | None = None
    """``prunekit prune --data D``: (calibration batches, held-out val batches, example inputs)."""
    cli_eval: Callable[[Any, nn.Module], int] | None = None  # ``prunekit eval`` on the parsed arguments
    cli_finetune: Callable[[Any, nn.Module], int] | None = None  # ``prunekit finetune`` on the parsed arguments


def names() -> list[str]:
    return list(TASKS)


def get(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise PrunekitError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


def for_name(model_name: str) -> Task:
    """The task a model name belongs to: the one that claims it, else classification."""
    return _owner(lambda t: t.owns_name(model_name))


def for_model(model: nn.Module) -> Task:
    """The task a loaded model belongs to: the one that claims it, else classification."""
    return _owner(lambda t: t.owns(model))


def _owner(claims: Callable[[Task], bool]) -> Task:
    return next((t for t in (get(n) for n in TASKS if n != DEFAULT) if claims(t)), get(DEFAULT))
