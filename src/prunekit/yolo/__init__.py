"""Ultralytics YOLO detectors as prunekit models (the optional extra ``prunekit[yolo]``).

Ultralytics is AGPL-3.0, so it is never a core dependency: this module imports it only inside
``ultralytics()``, which first switches off everything in it that reaches the network (connectivity
probe, analytics events, pip auto-install, font download, logger integrations) and keeps its
settings, fonts and runs in a prunekit-controlled directory.

``create("ul:yolov8n", num_classes=3)`` builds the ``DetectionModel`` from the yaml shipped with
Ultralytics (never a download) and rewrites the modules that split a tensor's channels with
``chunk``/``split`` (``C2f``, ``C3k2``, ``C2PSA``) into equivalent ones whose halves come from two
separate convs, so Torch-Pruning can trace which channels go where. ``head_layers`` and
``protected_layers`` name the layers pruning must leave alone: the head's box, class and DFL outputs
and the attention layers whose forward reshapes channels into heads.

One module per job: ``offline`` (importing Ultralytics without network access), ``model`` (names, building,
the traceable rewrite, what pruning keeps), ``trainer`` (training through Ultralytics), ``validation`` (mAP by
its validator) and ``data`` (detection data in the YOLO layout, which needs no Ultralytics).
"""

from __future__ import annotations

from . import data  # prunekit.yolo.data: VOC -> YOLO layout (needs no Ultralytics)
from .model import (
    DEFAULT_IMGSZ,
    PREFIX,
    SplitC2f,
    SplitC2PSA,
    _detect_heads,
    build_detection_model,
    check_trust,
    create,
    export_mode,
    head_layers,
    input_size,
    load_weights,
    make_traceable,
    predictions,
    protected_layers,
    resolve,
    split_conv,
)
from .offline import config_dir, quiet, ultralytics
from .trainer import OWN_SETTINGS, _signed, check_settings, train
from .validation import METRICS, validate

__all__ = ["DEFAULT_IMGSZ", "METRICS", "OWN_SETTINGS", "PREFIX", "SplitC2PSA", "SplitC2f", "_detect_heads", "_signed",
           "build_detection_model", "check_settings", "check_trust", "config_dir", "create", "data", "export_mode",
           "head_layers", "input_size", "load_weights", "make_traceable", "predictions", "protected_layers", "quiet",
           "resolve", "split_conv", "train", "ultralytics", "validate"]
