"""Detection as a task (``prunekit.tasks``): Ultralytics detectors on VOC folders or YOLO data sets.

The data set's own splits serve: val selects (and methods score on it), test is the final table's.
Training stages run Ultralytics' trainer on prunekit's model (``yolo.train``, settings under
``ultralytics:``); the metric is mAP50-95 in %, from Ultralytics' validator. Methods get letterboxed
training images as calibration batches, and validation batches with their boxes, on which
``evaluate`` computes mAP with Ultralytics' matching and AP code (so auto-mend scores candidates by
the detection metric).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .. import distill, io, models
from ..errors import PrunekitError, config_error
from ..measure import hooked
from ..tasks import Aids, Task, TaskData
from . import data as ydata
from . import export_mode, input_size, quiet, ultralytics

DEFAULT_EPOCHS = 10


class LabelledBatches:
    """Letterboxed images of a split with their boxes, as ``(images, labels)`` batches made on each pass.

    ``labels`` is (n, 6): image index in the batch, class, and the box's centre x, y, width, height as
    fractions of the letterboxed square (Ultralytics' batch layout), so ``Detection.evaluate`` can
    score any model on them without the data set at hand.
    """

    def __init__(self, data: ydata.DetectionData, split: str, imgsz: int, batch: int = 16):
        self.files = ydata.split_images(data, split)
        self.imgsz, self.batch = imgsz, batch

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.files), self.batch):
            files = self.files[start:start + self.batch]
            labels = [self._labels(i, f) for i, f in enumerate(files)]
            yield torch.stack([ydata.letterbox(f, self.imgsz) for f in files]), torch.cat(labels)

    def _labels(self, i: int, image: Path) -> torch.Tensor:
        """The image's YOLO labels moved into the letterboxed square ``letterbox`` makes of it."""
        lf = ydata.label_file(image)
        rows = [[float(v) for v in ln.split()[:5]] for ln in (lf.read_text().splitlines() if lf.is_file() else [])
                if ln.strip()]
        if not rows:
            return torch.zeros(0, 6)
        with Image.open(image) as im:
            w, h = im.size
        s = self.imgsz / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        px, py = (self.imgsz - nw) // 2, (self.imgsz - nh) // 2
        t = torch.tensor(rows)
        out = torch.zeros(len(rows), 6)
        out[:, 0], out[:, 1] = i, t[:, 0]
        out[:, 2] = (t[:, 1] * nw + px) / self.imgsz
        out[:, 3] = (t[:, 2] * nh + py) / self.imgsz
        out[:, 4], out[:, 5] = t[:, 3] * nw / self.imgsz, t[:, 4] * nh / self.imgsz
        return out


class Detection(Task):
    """mAP50-95 (%) by Ultralytics' validator; training by Ultralytics' trainer on prunekit's model."""

    name = "detect"
    metric = "mAP50-95"
    metric_label = "mAP50-95 (%)"
    data_hint = "a Pascal VOC directory or a YOLO data yaml"
    train_keys = frozenset({"epochs", "batch_size", "seed", "ultralytics"})
    train_keys_hint = ("detectors train with Ultralytics' trainer: give its settings under 'ultralytics:' "
                       "(e.g. lr0, optimizer, warmup_epochs)")
    default_batch = 16
    report_rows = (("test mAP50 (%)", "mAP50", "{:.2f}"),)
    latency_batches = (1,)

    # ---- models ----
    def owns_name(self, name: str) -> bool:
        return name.startswith(models.UL_PREFIX)

    def owns(self, model: nn.Module) -> bool:
        return models.is_detector(model)

    def create_model(self, spec: dict, data: TaskData, seed: int) -> nn.Module:
        """A new detector, or (``ul:path/to/best.pt``) one Ultralytics trained, its classes those of the data."""
        torch.manual_seed(seed)
        trained = spec["name"].endswith(".pt")
        extra = {"trust_pickle": True} if spec.get("trust_pickle") else {}
        model = models.create(spec["name"], num_classes=spec.get("num_classes") or (None if trained else
                                                                                   len(data.source.names)),
                              **({"imgsz": data.x.shape[-1]} | spec.get("kwargs", {}) | extra))
        self.check_model(model, data, spec["name"])
        if trained and list(model.names.values()) != list(data.source.names):
            raise PrunekitError(f"{spec['name']} was trained on classes {list(model.names.values())}, but "
                                f"{data.source.yaml} has {list(data.source.names)}; prune it on the data it "
                                "learned (same classes, same order)")
        return model

    def check_model(self, model: nn.Module, data: TaskData, source: str) -> None:
        if not self.owns(model):
            raise PrunekitError(f"{source} is not an Ultralytics detector (ul:<name>); task: detect needs one")
        classes = model.prunekit_arch["num_classes"]
        if classes != len(data.source.names):
            raise PrunekitError(f"{source} predicts {classes} classes but {data.source.yaml} has "
                                f"{len(data.source.names)}; use a matching checkpoint")

    def export_mode(self, model: nn.Module):
        return export_mode(model)

    def int8_float_nodes(self, model: nn.Module, graph: Any) -> dict[str, str]:
        """The detection head's decoding stays float: its last Concat joins box coordinates in pixels (0 to the
        image size) with class probabilities (0-1), which one int8 scale cannot hold both of, and its DFL softmax
        over 16 bins loses its resolution (measured: benchmarks/results/deploy-int8-bccd-yolov8n). The head's
        convolutions (``cv2``, ``cv3``) are quantised like every other layer."""
        from ultralytics.nn.modules.head import Detect

        heads = [f"/{name}/" for name, m in model.named_modules() if isinstance(m, Detect)]
        why = "detection head decoding (boxes in pixels and class probabilities share one tensor)"
        return {n.name: why for n in graph.node
                if any(n.name.startswith(h) and not n.name.startswith(f"{h}cv") for h in heads)}

    # ---- data and metric ----
    def load_data(self, spec: dict, *, seed: int, split_seed: int, device: torch.device) -> TaskData:
        det = ydata.detection_data(spec["name"], split_seed=split_seed)  # a folder without splits: a seeded split
        for line in det.summary().splitlines():  # what each split holds, and what conversion changed
            print(f"prunekit: data {line}", file=sys.stderr)
        missing = [s for s in ("train", "val", "test") if s not in det.images]
        if missing:
            raise config_error("data.name", f"{spec['name']} has no {' or '.join(missing)} split; detectors need "
                               "train, val and test")
        imgsz = spec.get("image_size") or 640
        bs = spec.get("batch_size", self.default_batch)
        calib = ydata.image_batches(det, "train", imgsz=imgsz, batch=bs, seed=seed,
                                    limit=bs * spec.get("calibration_batches", 4))
        return TaskData(train=det.yaml, val=LabelledBatches(det, "val", imgsz, bs),
                        test=LabelledBatches(det, "test", imgsz, bs), calib=calib, x=calib[0][0],
                        sizes=dict(det.images), record={"data": str(det.yaml), **det.images}, batch_size=bs,
                        source=det, info={"data": str(det.yaml)},
                        files={f"splits/{s}.txt": p for s, p in det.split_files.items()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """mAP50-95 and mAP50 (%) of ``model`` on ``(images, labels)`` batches (``LabelledBatches``' layout),
        by Ultralytics' own NMS, matching and AP code at its validation settings (conf 0.001, IoU 0.7)."""
        ultralytics()
        from ultralytics.models.yolo.detect import DetectionValidator

        head = model.model[-1] if hasattr(model, "model") else None
        nc = getattr(head, "nc", None)
        if nc is None:
            raise PrunekitError("the detection task evaluates Ultralytics detection models (ul:<name>) only")
        v = DetectionValidator(args={"conf": 0.001, "iou": 0.7, "plots": False, "save_json": False, "task": "detect"})
        names = _Names(nc)
        v.device, v.training, v.data = device, True, {"names": names.names}
        v.init_metrics(names)
        with hooked(model):
            for images, labels in batches:
                images = images.to(device)
                labels = labels.to(device)
                n, size = len(images), tuple(images.shape[2:])
                batch = {"img": images, "batch_idx": labels[:, 0], "cls": labels[:, 1:2], "bboxes": labels[:, 2:],
                         "ori_shape": [size] * n, "ratio_pad": [((1.0, 1.0), (0.0, 0.0))] * n,
                         "im_file": [f"{i}.jpg" for i in range(n)]}
                v.update_metrics(v.postprocess(model(images)), batch)
        with quiet():
            stats = v.get_stats()
        return {"mAP50-95": 100 * float(stats["metrics/mAP50-95(B)"]), "mAP50": 100 * float(stats["metrics/mAP50(B)"])}

    def score(self, model: nn.Module, data: TaskData, split: str, device: torch.device) -> float:
        return self._validate(model, data, split, device)["mAP50-95"]

    def test_metrics(self, model: nn.Module, data: TaskData, device: torch.device) -> dict[str, float]:
        maps = self._validate(model, data, "test", device)
        return {"mAP50-95": maps["mAP50-95"], "mAP50": maps["mAP50"]}

    @staticmethod
    def _validate(model: nn.Module, data: TaskData, split: str, device: torch.device) -> dict[str, float]:
        """Ultralytics' validator on a split of the data yaml (rectangular batches, as ``YOLO.val()``), in %."""
        from . import validate

        maps = validate(model, data.source.yaml, split=split, imgsz=data.x.shape[-1], device=_ul_device(device))
        return {k: 100 * v for k, v in maps.items()}

    # ---- training ----
    def check_stage(self, stage: dict, where: str) -> None:
        if stage.get("ultralytics"):
            from . import check_settings

            try:
                check_settings(stage["ultralytics"])
            except PrunekitError as exc:
                raise config_error(f"{where}.ultralytics", str(exc)) from exc
        elif not isinstance(stage.get("ultralytics", {}), dict):
            raise config_error(f"{where}.ultralytics", "must be a mapping of Ultralytics train settings")
        for key in ("epochs", "batch_size", "seed"):
            v = stage.get(key)
            if v is not None and v != "rest" and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise config_error(f"{where}.{key}", f"must be an integer >= 0, got {v!r}")

    def stage_epochs(self, stage: dict) -> int | str:
        return stage.get("epochs", DEFAULT_EPOCHS)

    def train_stage(self, model: nn.Module, stage: dict, data: TaskData, *, kind: str, epochs: int, sdir: Path,
                    aids: Aids, seed: int, device: torch.device, log: Path,
                    desc: str) -> tuple[nn.Module, float | None]:
        """Ultralytics' trainer; a sparsify stage keeps its last epoch (its best is its least sparse), others
        their best on val."""
        from . import train

        if not epochs:
            return model, None
        batch = stage.get("batch_size", data.batch_size)
        steps = max(1, epochs * -(-data.sizes["train"] // batch))
        kd = None
        if aids.teacher is not None:
            net, spec = aids.teacher
            check_teacher(net, model, data.x, f"{desc}.distill")
            kd = (net, spec["alpha"], spec["temperature"])
        with aids.zeros_kept(model) as masks:
            metrics = train(model, data.train, epochs=epochs, imgsz=data.x.shape[-1], batch=batch,
                            device=_ul_device(device), project=sdir, name="ultralytics",
                            after_backward=aids.hook(model, steps), resume=True, distill=kd,
                            keep="last" if kind == "sparsify" else "best", seed=stage.get("seed", seed),
                            log_path=log, **stage.get("ultralytics", {}))
        if masks is not None:
            masks.apply(model)  # and the weights kept (best or last epoch's EMA) hold exactly those zeros
        metric = metrics.get("metrics/mAP50-95(B)")
        return model, None if metric is None else 100 * metric

    def report_figures(self, run: dict) -> list[tuple[str, bytes | None, str | None]]:
        """A grid of validation images with the base's and the pruned model's boxes."""
        m = run["metrics"]
        files = m.get("models") or {}
        if not files or not m.get("data"):
            return []
        try:
            from .tools import draw_detections

            nets = {label: io.load(_run_path(run, files[key])) for key, label in (("before", "base"),
                                                                                  ("after", "pruned"))
                    if files.get(key)}
            return [("detections", draw_detections(nets, _run_path(run, m["data"]), split="val", n=4), None)]
        except (PrunekitError, OSError) as exc:
            return [("detections", None, f"validation images not drawn: {exc}")]

    # ---- the CLI on a detector file ----
    def cli_data_spec(self, args: Any, model: nn.Module) -> dict:
        spec = {"name": args.data, "image_size": input_size(model), "calibration_batches": args.calibration_batches}
        return {k: v for k, v in spec.items() if v is not None}

    def cli_calibration(self, data: str, model: nn.Module, seed: int) -> tuple[Any, Any, torch.Tensor]:
        """Letterboxed training images (calibration) and validation images with their boxes (scoring)."""
        det = ydata.detection_data(data)
        imgsz = input_size(model)
        calib = ydata.image_batches(det, "train", imgsz=imgsz, batch=16, seed=seed, limit=64)
        val = LabelledBatches(det, "val", imgsz) if "val" in det.images else None
        return calib, val, calib[0][0]

    def cli_eval(self, args: Any, model: nn.Module) -> int:
        from . import tools

        unused = [f"--{k.replace('_', '-')}" for k in ("data_root", "download", "image_size", "limit", "base")
                  if getattr(args, k, None)]
        if unused:
            raise PrunekitError(f"{', '.join(unused)} apply to classifiers only; a detector takes --data (a Pascal "
                                "VOC directory or a YOLO data yaml), --split and --imgsz")
        res = tools.evaluate(model, args.data, split=args.split, imgsz=args.imgsz, batch=args.batch_size,
                             repeats=args.repeats, threads=args.threads, cache_dir=args.cache_dir)
        res = {"checkpoint": str(args.checkpoint), **res}
        print(json.dumps(res) if args.json else tools.format_evaluation(res))
        return 0

    def cli_finetune(self, args: Any, model: nn.Module) -> int:
        """Ultralytics' trainer on a VOC directory or YOLO data yaml; the model kept, written to OUT/model.pt."""
        from . import train

        out = Path(args.out)
        if not str(args.out).strip():
            raise PrunekitError("--out is empty: give a folder for the run")
        if (out / "model.pt").exists() and not args.force:
            raise PrunekitError(f"{out} already holds a finished run; use --force or another --out")
        kd = None
        if args.distill:
            spec = distill.check({"teacher": args.distill, "alpha": args.alpha, "temperature": args.temperature},
                                 "--distill")
            teacher = io.load(spec["teacher"])
            size = input_size(model)
            check_teacher(teacher, model, torch.zeros(1, 3, size, size), "--distill")
            kd = (teacher, spec["alpha"], spec["temperature"])
        with io.run_lock(out):
            metrics = train(model, args.data, epochs=args.epochs, batch=args.batch_size or self.default_batch,
                            project=out, name="ultralytics", seed=args.seed, resume=args.resume, distill=kd)
            io.save(model, out / "model.pt")
        print(json.dumps({"out": str(out / "model.pt"), **metrics}))
        return 0


def check_teacher(teacher: nn.Module, student: nn.Module, example_inputs: torch.Tensor, where: str) -> None:
    """The teacher must be a detector whose predictions have the student's shape (classes, anchors)."""
    x = example_inputs[:1]
    try:
        with hooked(teacher), hooked(student), export_mode(teacher), export_mode(student):
            t, s = teacher(x), student(x)
    except Exception as exc:
        raise PrunekitError(f"{where}.teacher is not a detector that runs on the student's images "
                            f"({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
    if not isinstance(t, torch.Tensor) or t.shape != s.shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise PrunekitError(f"{where}.teacher predicts {shape}, the student {tuple(s.shape)}: another class count "
                            "or architecture family; distil from the unpruned detector")


class _Names:
    """What Ultralytics' validator reads of a model to set up its metrics: class names, no end-to-end head."""

    def __init__(self, nc: int):
        self.names = dict(enumerate(map(str, range(nc))))
        self.end2end = False


def _ul_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device.index or 0)


def _run_path(run: dict, value: str) -> Path:
    """A path metrics.json records: as written if it exists (absolute, or relative to here), else inside the run."""
    p = Path(value).expanduser()
    return p if p.is_absolute() or p.exists() else run["dir"] / p


TASK = Detection()
