"""Cross-check Ultralytics' mAP against pycocotools on the same predictions.

Runs Ultralytics' DetectionValidator (the one ``prunekit eval --task detect`` and the pipeline use) on
one split of a detection data set with ``save_json``, so every prediction it scored (conf >= 0.001,
NMS IoU 0.7, up to 300 per image) is written to ``predictions.json``; converts the split's ground
truth (the YOLO label files Ultralytics reads, i.e. after prunekit's VOC conversion) to COCO json;
and scores the same predictions with pycocotools' COCOeval. Both mAP50-95 and mAP50 are printed
and written as JSON. COCOeval is run twice: with COCO's standard 100 detections per image, and with
300 (Ultralytics' ``max_det``), which is the like-for-like comparison.

pycocotools is not a prunekit dependency; install it for this check only:

    .venv/bin/pip install pycocotools
    python benchmarks/yolo_map_check.py MODEL.pt --data ../shared/data/bccd --split test \\
        --out benchmarks/results/yolo-map-check.json

MODEL.pt is a prunekit model file (``prunekit.save``) of an ``ul:`` detector; ``--imgsz`` defaults to
the model's recorded input size.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import shlex
import sys
import tempfile
import time
from contextlib import redirect_stdout
from importlib.metadata import version
from pathlib import Path

import torch
from PIL import Image

import prunekit as pk
from prunekit import yolo
from prunekit.yolo import tools
from prunekit.yolo.data import detection_data


def ultralytics_predictions(model, ds, split: str, imgsz: int, batch: int, workdir: Path) -> tuple[dict, list]:
    """Ultralytics' metrics on ``split`` and the predictions it scored (COCO json rows, image_id = file stem)."""
    yolo.ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator

    class JsonOnly(DetectionValidator):
        def eval_json(self, stats):  # its own COCO pass needs faster-coco-eval (a pip install): not wanted here
            return stats

    args = {"data": str(ds.yaml), "split": split, "imgsz": imgsz, "batch": batch, "device": "cpu", "conf": 0.001,
            "iou": 0.7, "plots": False, "verbose": False, "save_json": True, "project": str(workdir),
            "name": "val", "exist_ok": True}
    validator = JsonOnly(args=args)
    net = copy.deepcopy(model).float().eval()
    net.names = dict(enumerate(ds.names))
    stats = validator(model=net)
    preds = json.loads((Path(validator.save_dir) / "predictions.json").read_text())
    return {"mAP50-95": float(stats["metrics/mAP50-95(B)"]), "mAP50": float(stats["metrics/mAP50(B)"]),
            "precision": float(stats["metrics/precision(B)"]), "recall": float(stats["metrics/recall(B)"])}, preds


def coco_ground_truth(files: list[Path], names: list[str]) -> tuple[dict, dict[str, int]]:
    """COCO json of the split's YOLO labels (boxes in pixels, category = class + 1) and stem -> image id."""
    images, anns, ids = [], [], {}
    for i, f in enumerate(files, 1):
        with Image.open(f) as im:
            w, h = im.size
        ids[f.stem] = i
        images.append({"id": i, "file_name": f.name, "width": w, "height": h})
        for c, x1, y1, x2, y2 in tools._labels(f, w, h):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}, ids


def cocoeval(gt_json: dict, preds: list[dict], max_dets: int) -> dict:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        sys.exit("pycocotools is not installed: .venv/bin/pip install pycocotools (for this check only)")
    with redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_json
        gt.createIndex()
        dt = gt.loadRes(preds) if preds else COCO()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    # COCO's summary, read at the last maxDets (summarize() itself hard-codes 100 for mAP50-95): precision over
    # IoU thresholds x recall points x classes, area "all"; -1 marks classes without ground truth
    prec = ev.eval["precision"][:, :, :, 0, -1]
    return {"mAP50-95": float(prec[prec > -1].mean()), "mAP50": float(prec[0][prec[0] > -1].mean()),
            "max_dets": max_dets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a prunekit model file (prunekit.save) of an ul: detector")
    ap.add_argument("--data", default="../shared/data/bccd", help="Pascal VOC directory or YOLO data yaml")
    ap.add_argument("--split", default="test")
    ap.add_argument("--imgsz", type=int, help="default: the model's recorded input size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/yolo-map-check.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = pk.load(args.model).eval()
    if not pk.models.is_detector(model):
        sys.exit(f"{args.model} is not an ul: detector")
    imgsz = args.imgsz or tools.input_size(model)
    ds = detection_data(args.data)
    files, names = tools.split_images(ds, args.split), ds.names
    with tempfile.TemporaryDirectory() as d:
        ul_metrics, preds = ultralytics_predictions(model, ds, args.split, imgsz, args.batch, Path(d))
    gt_json, ids = coco_ground_truth(files, names)
    missing = {p["image_id"] for p in preds} - set(ids)
    if missing:
        sys.exit(f"predictions for images not in the split's ground truth: {sorted(missing)[:5]}")
    coco_preds = [{**p, "image_id": ids[p["image_id"]]} for p in preds]
    coco = {f"maxDets{m}": cocoeval(gt_json, coco_preds, m) for m in (100, 300)}
    like = coco["maxDets300"]
    row = {
        "model": str(args.model), "arch": model.prunekit_arch.get("name"), "data": str(args.data),
        "split": args.split, "imgsz": imgsz, "images": len(files), "objects": len(gt_json["annotations"]),
        "predictions": len(preds), "ultralytics": ul_metrics, "pycocotools": coco,
        "difference_maxDets300": {k: like[k] - ul_metrics[k] for k in ("mAP50-95", "mAP50")},
        "wall_s": round(time.perf_counter() - t0, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ultralytics": yolo.ultralytics().__version__,
                     "pycocotools": version("pycocotools")},
        "command": "python " + shlex.join(sys.argv),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{row['arch']} on {args.data} split {args.split} ({len(files)} images, {row['objects']} objects, "
          f"{len(preds)} predictions), imgsz {imgsz}")
    print(f"{'evaluator':<34} {'mAP50-95':>9} {'mAP50':>9}")
    print(f"{'Ultralytics DetectionValidator':<34} {ul_metrics['mAP50-95']:>9.4f} {ul_metrics['mAP50']:>9.4f}")
    for key, res in coco.items():
        print(f"{'pycocotools COCOeval ' + key:<34} {res['mAP50-95']:>9.4f} {res['mAP50']:>9.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
