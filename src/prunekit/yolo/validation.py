"""Validation through Ultralytics' ``DetectionValidator``: mAP50-95, mAP50, precision and recall."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from torch import nn

from ..errors import PrunekitError
from . import data
from .model import input_size
from .offline import config_dir, quiet, threads_kept, ultralytics

METRICS = {"mAP50-95": "metrics/mAP50-95(B)", "mAP50": "metrics/mAP50(B)", "precision": "metrics/precision(B)",
           "recall": "metrics/recall(B)"}


@threads_kept()
def validate(model: nn.Module, dataset: str | Path, *, split: str = "val", imgsz: int | None = None,
             batch: int = 16, device: str = "cpu", conf: float = 0.001, iou: float = 0.7,
             verbose: bool = False) -> dict[str, float]:
    """mAP50-95, mAP50, precision and recall of ``model`` on a split of ``dataset``, by Ultralytics' validator.

    The validator fuses conv and BN of the model it is given, so it gets a copy: ``model`` is unchanged.
    ``conf``/``iou`` are Ultralytics' validation defaults (the mAP protocol: low confidence, NMS IoU 0.7).
    Ultralytics' own log lines (its per-class table) are shown only with ``verbose``: a CLI printing JSON
    to stdout must not get them mixed in.
    """
    ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator

    ds = data.detection_data(dataset)
    if split not in ds.images:
        raise PrunekitError(f"{ds.yaml} has no split {split!r}; it has {', '.join(ds.images)}")
    args = {"data": str(ds.yaml), "split": split, "imgsz": imgsz or input_size(model), "batch": batch, "device": device,
            "conf": conf, "iou": iou, "plots": False, "verbose": False, "save_json": False,
            "project": str(config_dir() / "runs"), "name": "val", "exist_ok": True}
    validator = DetectionValidator(args=args)
    net = copy.deepcopy(model).float().eval()
    net.names = dict(enumerate(ds.names))
    with contextlib.nullcontext() if verbose else quiet():
        stats = validator(model=net)
    return {short: float(stats[key]) for short, key in METRICS.items()}
