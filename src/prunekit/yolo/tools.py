"""Detectors after pruning: export to Ultralytics, evaluate (mAP, cost, latency), draw predictions.

``to_ultralytics(model, path)`` writes a prunekit detector (pruned or not) as a checkpoint Ultralytics
loads with ``YOLO(path)``: ``.val()``, ``.predict()`` and its exporters then work on the pruned
architecture. ``evaluate(model, dataset)`` gives what ``prunekit eval --task detect`` prints.
``draw_detections(models, dataset)`` draws a grid of images with each model's boxes for reports.

Ultralytics is imported only inside the functions, through ``prunekit.yolo.ultralytics()`` (offline).
"""

from __future__ import annotations

import copy
import io
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PrunekitError
from . import export_mode, input_size, ultralytics, validate
from .data import detection_data, split_images


def _check_detector(model: nn.Module) -> None:
    from . import _detect_heads

    ultralytics()
    if not isinstance(model, nn.Module) or not _detect_heads(model):
        name = (getattr(model, "prunekit_arch", None) or {}).get("name", type(model).__name__)
        raise PrunekitError(f"'{name}' is not an Ultralytics detector (no Detect head); build one with "
                            "prunekit.models.create('ul:yolov8n', num_classes=...)")


# ---- export to Ultralytics ----
def to_ultralytics(model: nn.Module, path: str | Path, *, names: list[str] | dict[int, str] | None = None,
                   data: str | Path | None = None, half: bool = False) -> Path:
    """Write ``model`` as an Ultralytics checkpoint: ``YOLO(path).val(data=...)`` and ``.predict(img)`` work on it.

    The file is laid out as Ultralytics' trainer saves a final checkpoint (``model``, ``train_args``, ``date``,
    ``version``, ``epoch=-1``; no optimizer, no EMA), holding a deep copy of ``model`` with its pruned
    layer widths, so Ultralytics never rebuilds it from a yaml. ``names`` are the class names (default:
    the model's ``names``, else the classes of ``data``); ``data`` (a VOC directory or YOLO data yaml)
    is recorded so ``YOLO(path).val()`` finds it, ``imgsz`` is the model's recorded input size.
    Weights stay float32 unless ``half=True`` (Ultralytics' own files are fp16, which changes predictions
    by ~1e-3); Ultralytics loads either as float32.

    The file is a Python **pickle**, as every Ultralytics ``.pt`` is: it is meant only for Ultralytics'
    tools (val, predict, its exporters), and it names prunekit classes (``prunekit.yolo.SplitC2f``, ...),
    so it loads only where prunekit is installed. Opening a pickle runs code, so only open files you
    trust. To keep and share a pruned model, use ``prunekit.save`` (tensors and a recipe, no pickle).
    """
    _check_detector(model)
    ul = ultralytics()
    path = Path(path).expanduser()
    if path.suffix != ".pt":
        raise PrunekitError(f"Ultralytics loads checkpoints named *.pt; got {path.name}")
    ds = detection_data(data) if data is not None else None
    net = copy.deepcopy(model).cpu().float().eval()
    if names is not None:
        net.names = dict(enumerate(names)) if isinstance(names, list | tuple) else dict(names)
    elif ds is not None:
        net.names = dict(enumerate(ds.names))
    head_nc = net.model[-1].nc
    if len(getattr(net, "names", {}) or {}) != head_nc:
        raise PrunekitError(f"the model predicts {head_nc} classes but {len(net.names)} names were given")
    if half:
        net.half()
    for p in net.parameters():
        p.requires_grad_(False)
    for m in net.modules():  # a hook left by prunekit (masks, measurements) is no part of the model
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    if hasattr(net, "criterion"):
        net.criterion = None
    imgsz, arch = input_size(model), getattr(model, "prunekit_arch", None) or {}
    train_args = {"task": "detect", "imgsz": imgsz, "data": str(ds.yaml) if ds is not None else None,
                  "single_cls": False, "model": str(arch.get("name", "prunekit"))}
    ckpt = {"date": datetime.now().astimezone().isoformat(), "version": ul.__version__, "epoch": -1,
            "best_fitness": None, "model": net, "ema": None, "updates": None, "optimizer": None,
            "train_args": train_args, "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "prunekit": {"arch": arch, "format": "ultralytics-checkpoint"}}
    buf = io.BytesIO()
    try:
        torch.save(ckpt, buf)
    except Exception as exc:  # an attribute someone attached that pickle cannot store
        raise PrunekitError(f"cannot write the model as an Ultralytics checkpoint ({type(exc).__name__}: {exc})"
                            ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


# ---- evaluate ----
def evaluate(model: nn.Module, dataset: str | Path | None = None, *, split: str = "test", imgsz: int | None = None,
             batch: int = 16, repeats: int = 30, threads: int | None = None, onnx: bool = True,
             cache_dir: str | Path | None = None) -> dict[str, Any]:
    """mAP50 / mAP50-95 (Ultralytics' validator), params, MACs at ``imgsz`` and batch-1 latency (eager, ORT).

    mAP, precision and recall are fractions here (as in Ultralytics' own results and ``--json``); the table
    ``format_evaluation`` prints, the pipeline's metrics and the report give them in %.

    ``dataset`` is a Pascal VOC directory or a YOLO data yaml (``None``: cost only, no mAP); ``imgsz``
    defaults to the model's recorded input size. Latency is timed on the decoded-prediction forward
    (``export_mode``: what a deployed detector runs, and what goes to ONNX), without NMS.
    """
    from ..measure import measure
    from ..timing import sequential

    _check_detector(model)
    imgsz = imgsz or input_size(model)
    if imgsz % 32:
        raise PrunekitError(f"imgsz must be a multiple of 32 (the largest YOLO stride), got {imgsz}")
    model = model.cpu().float().eval()
    arch = getattr(model, "prunekit_arch", None) or {}
    out: dict[str, Any] = {"task": "detect", "model": arch.get("name"), "imgsz": imgsz}
    if dataset is not None:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise PrunekitError(f"data not found: {path} (give a Pascal VOC directory or a YOLO data yaml)")
        ds = detection_data(path, cache_dir=cache_dir)
        if len(ds.names) != model.model[-1].nc:
            raise PrunekitError(f"the model predicts {model.model[-1].nc} classes but {path} has {len(ds.names)} "
                                f"({', '.join(ds.names)})")
        maps = validate(model, ds.yaml, split=split, imgsz=imgsz, batch=batch)  # refuses a split ds lacks
        out |= {"data": str(path), "split": split, "images": ds.images[split]} | maps
    x = torch.zeros(1, 3, imgsz, imgsz)
    with export_mode(model), torch.no_grad():
        stats = measure(model, x, batch_sizes=(1,), repeats=repeats, threads=threads)
        out |= {k: stats[k] for k in ("params", "macs", "size_bytes")} | {"latency": stats["latency"]}
        if onnx:
            out["onnx_latency"] = sequential(model, x, batch_sizes=(1,), repeats=repeats, threads=threads)
    return out


def format_evaluation(res: dict[str, Any]) -> str:
    """``evaluate``'s result as the table ``prunekit eval --task detect`` prints."""
    lines = [f"model        {res.get('model')} at {res['imgsz']}x{res['imgsz']}"]
    if "mAP50" in res:
        lines.append(f"data         {res['data']} (split {res['split']}, {res.get('images')} images)")
        lines += [f"{k:<12} {100 * res[k]:.2f} %" for k in ("mAP50", "mAP50-95", "precision", "recall")]
    lines += [f"params       {res['params'] / 1e6:.4f} M",
              f"MACs         {res['macs'] / 1e9:.3f} G (at {res['imgsz']})"]
    for b, lat in res["latency"].items():
        lines.append(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, {lat['threads']} threads, torch eager)")
    for b, lat in res.get("onnx_latency", {}).items():
        lines.append(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, onnxruntime)")
    return "\n".join(lines)


# ---- images of a split ----
def _labels(image: Path, width: int, height: int) -> np.ndarray:
    """Ground truth of ``image`` from its YOLO label file, as rows (class, x1, y1, x2, y2) in pixels."""
    sep_img, sep_lbl = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    label = Path(sep_lbl.join(str(image).rsplit(sep_img, 1))).with_suffix(".txt")
    if not label.is_file():
        return np.zeros((0, 5))
    rows = np.array([[float(v) for v in ln.split()[:5]] for ln in label.read_text().splitlines() if ln.strip()])
    if not len(rows):
        return np.zeros((0, 5))
    c, cx, cy, w, h = rows.T
    return np.stack([c, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)


@torch.no_grad()
def detect(model: nn.Module, image: str | Path | np.ndarray, *, imgsz: int | None = None, conf: float = 0.25,
           iou: float = 0.7, max_det: int = 300) -> np.ndarray:
    """Boxes of ``model`` on one image as Ultralytics' predictor finds them (letterbox to ``imgsz``, NMS, boxes
    scaled back): rows (x1, y1, x2, y2, conf, class) in the image's pixels. ``image``: a file or a BGR array."""
    ultralytics()
    import cv2
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import nms, ops

    im0 = cv2.imread(str(image)) if not isinstance(image, np.ndarray) else image
    if im0 is None:
        raise PrunekitError(f"cannot read image {image}")
    imgsz = imgsz or input_size(model)
    im = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=im0)
    x = torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]
    dev = next(model.parameters()).device
    model.eval()
    pred = model(x.to(dev))
    det = nms.non_max_suppression(pred, conf, iou, max_det=max_det)[0].cpu()
    det[:, :4] = ops.scale_boxes(x.shape[2:], det[:, :4], im0.shape[:2])
    return det.numpy()


# ---- drawing ----
def draw_detections(models: dict[str, nn.Module], dataset: str | Path, split: str = "val", n: int = 4,
                    path: str | Path | None = None, imgsz: int | None = None, conf: float = 0.25,
                    names: list[str] | None = None) -> bytes:
    """A grid of ``n`` images of ``split`` (rows) by ``models`` (columns) with predicted boxes and class labels.

    Predictions are drawn where confidence >= ``conf`` after Ultralytics' NMS (IoU 0.7), in a colour per
    class with ``name score``; ground truth is drawn under them as thin dashed white boxes. The images are
    the first ``n`` of the split, so base and pruned are compared on the same ones. Returns the PNG bytes
    and writes them to ``path`` when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ..plots import png

    if not models:
        raise PrunekitError("draw_detections needs at least one model")
    for m in models.values():
        _check_detector(m)
    ds = detection_data(dataset)
    files, ds_names = split_images(ds, split), list(ds.names)
    names = names or ds_names
    files = files[:n]
    if not files:
        raise PrunekitError(f"split {split!r} of {dataset} has no images")
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(files), len(models), figsize=(3.6 * len(models), 3.0 * len(files)), squeeze=False)
    for r, f in enumerate(files):
        img = np.asarray(Image.open(f).convert("RGB"))
        h, w = img.shape[:2]
        gt = _labels(f, w, h)
        for c, (label, model) in enumerate(models.items()):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            for _, x1, y1, x2, y2 in gt:
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=0.8, ls="--"))
            det = detect(model, img[..., ::-1].copy(), imgsz=imgsz, conf=conf)
            for x1, y1, x2, y2, score, cls in det:
                col = colours(int(cls) % 10)
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=col, lw=1.4))
                name = names[int(cls)] if int(cls) < len(names) else str(int(cls))
                ax.text(x1, y1, f"{name} {score:.2f}", color="white", fontsize=5, va="bottom",
                        bbox={"facecolor": col, "alpha": 0.8, "pad": 0.5, "lw": 0})
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f.stem, fontsize=7)
            ax.text(0.99, 0.01, f"{len(det)} boxes / {len(gt)} true", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.5, "lw": 0})
    fig.suptitle(f"predictions (conf ≥ {conf}, colour per class) and ground truth (white dashed), split {split}",
                 fontsize=9)
    fig.tight_layout()
    image = png(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(image)
    return image
