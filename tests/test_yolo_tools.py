"""Detector tools: Ultralytics-loadable export, `prunekit eval --task detect`, report images with boxes.

Small and fast: yolov3-tinyu at imgsz 160 on a few BCCD images, sockets guarded as in yolo_helpers.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)
from prunekit.yolo import tools  # noqa: E402

from .conftest import SHARED  # noqa: E402
from .yolo_helpers import net_attempts, offline, randomise_bn  # noqa: E402, F401  (the socket guard, one per module)

BCCD = SHARED / "bccd"
pytestmark = pytest.mark.filterwarnings("ignore:bccd-subset")  # its counted box fixes: test_yolo.py checks them
IMGSZ = 160
X = torch.zeros(1, 3, IMGSZ, IMGSZ)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A Pascal VOC directory over 8 train, 6 val and 4 test images of BCCD (links to the shared copy)."""
    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    root = tmp_path_factory.mktemp("bccd-subset")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for folder in ("Annotations", "JPEGImages"):
        (root / folder).symlink_to(BCCD / folder, target_is_directory=True)
    for split, n in (("train", 8), ("val", 6), ("test", 4)):
        ids = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:n]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


_BASE: dict[str, nn.Module] = {}


def detector(pruned: bool = False) -> nn.Module:
    """yolov3-tinyu at 160 with BN statistics away from defaults and class biases at 0, so that an untrained model
    still finds boxes at conf 0.25 (pruned: l1-norm 1.5x fewer MACs, the head kept)."""
    key = "pruned" if pruned else "base"
    if key not in _BASE:
        if "base" not in _BASE:
            torch.manual_seed(0)
            model = randomise_bn(pk.models.create("ul:yolov3-tinyu", num_classes=3, imgsz=IMGSZ).eval())
            with torch.no_grad():
                for seq in model.model[-1].cv3:
                    seq[-1].bias.zero_()
            _BASE["base"] = model
        if pruned:
            model = copy.deepcopy(_BASE["base"])
            pk.prune(model, "l1-norm", X, speedup=1.5, ignored_layers=yolo.protected_layers(model))
            _BASE["pruned"] = model
    return copy.deepcopy(_BASE[key])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- export to Ultralytics ----
def test_pruned_detector_as_ultralytics_checkpoint(subset: Path, tmp_path: Path) -> None:
    model = detector(pruned=True)
    path = tools.to_ultralytics(model, tmp_path / "pruned.pt", data=subset)
    yolo.ultralytics()
    from ultralytics import YOLO

    ul = YOLO(str(path))
    assert ul.task == "detect" and ul.model.names == {0: "Platelets", 1: "RBC", 2: "WBC"}
    assert params(ul.model) == params(model) < params(detector())  # the pruned widths, not rebuilt from a yaml
    image = yolo.data.split_images(yolo.data.detection_data(subset), "val")[0]
    got = ul.predict(str(image), imgsz=IMGSZ, conf=0.25, rect=False, verbose=False)[0].boxes.data.numpy()
    want = tools.detect(model, image, conf=0.25)
    assert len(want) >= 3 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want[:, :4]).max()))
    metrics = ul.val(imgsz=IMGSZ, batch=6, plots=False, verbose=False)  # data: the converted yaml it records
    ours = yolo.validate(model, subset, split="val", imgsz=IMGSZ, batch=6)
    assert metrics.box.map50 == pytest.approx(ours["mAP50"], abs=1e-3)
    assert metrics.box.map == pytest.approx(ours["mAP50-95"], abs=1e-3)
    with pytest.raises(PrunekitError, match="not an Ultralytics detector"):
        tools.to_ultralytics(pk.models.create("resnet20"), tmp_path / "r.pt")
    with pytest.raises(PrunekitError, match="predicts 3 classes but 2 names"):
        tools.to_ultralytics(model, tmp_path / "x.pt", names=["a", "b"])


def test_yolo_map_check_script_runs_and_agrees_with_cocoeval(subset: Path, tmp_path: Path) -> None:
    """benchmarks/yolo_map_check.py (Ultralytics' mAP against pycocotools on the same predictions) at HEAD."""
    pk.save(detector(pruned=True), tmp_path / "det.pt")
    script = Path(__file__).parents[1] / "benchmarks" / "yolo_map_check.py"
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "det.pt"), "--data", str(subset),
                           "--split", "val", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["images"] == 6 and row["predictions"] > 0
    ul, coco = row["ultralytics"], row["pycocotools"]["maxDets300"]
    assert 0 <= ul["mAP50-95"] <= 1 and ul["mAP50"] == pytest.approx(coco["mAP50"], abs=0.02)


# ---- prunekit eval --task detect ----
def test_eval_detect_cli(subset: Path, tmp_path: Path, capsys) -> None:
    from prunekit.cli import main

    pk.save(detector(pruned=True), tmp_path / "det.pt")
    pk.save(pk.models.create("resnet20"), tmp_path / "cls.pt")
    common = ["--data", str(subset), "--split", "val", "--repeats", "2"]
    assert main(["eval", "--checkpoint", str(tmp_path / "det.pt"), *common, "--json"]) == 0  # task inferred
    res = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone (Ultralytics logs to stderr)
    assert res["task"] == "detect" and res["imgsz"] == IMGSZ and res["split"] == "val"
    assert 0 <= res["mAP50"] <= 1 and 0 <= res["mAP50-95"] <= res["mAP50"]
    assert res["params"] == params(detector(pruned=True)) and res["macs"] > 0
    assert res["latency"]["b1"]["median_ms"] > 0 and res["onnx_latency"]["b1"]["median_ms"] > 0
    assert main(["eval", "--checkpoint", str(tmp_path / "det.pt"), "--task", "detect", *common, "--imgsz", "128"]) == 0
    table = capsys.readouterr().out
    for text in ("mAP50 ", "mAP50-95", "params", "MACs", "(at 128)", "torch eager", "onnxruntime"):
        assert text in table
    for argv, message in (
            (["--checkpoint", str(tmp_path / "cls.pt"), "--task", "detect"],
             "a model of task classify: evaluate it with --task classify"),
            (["--checkpoint", str(tmp_path / "det.pt"), "--task", "classify"], "evaluate it with --task detect"),
            (["--checkpoint", str(tmp_path / "det.pt"), "--data", str(tmp_path / "nope")], "data not found"),
            (["--checkpoint", str(tmp_path / "det.pt"), "--data", str(subset), "--split", "dev"], "no split 'dev'"),
            (["--checkpoint", str(tmp_path / "det.pt"), "--limit", "3"], "--limit apply to classifiers only"),
            (["--checkpoint", str(tmp_path / "cls.pt"), "--split", "val"], "apply to detectors")):
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


# ---- report ----
def test_report_of_a_detect_run_shows_map_and_boxes(subset: Path, tmp_path: Path) -> None:
    from prunekit.report import write_report

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    pk.save(detector(), run / "models" / "before.pt")
    pk.save(detector(pruned=True), run / "models" / "after.pt")
    row = {"params": 1, "macs": 2, "latency_b1_ms": 3.0}
    metrics = {"name": "bccd-l1", "task": "detect", "method": "l1-norm", "data": str(subset),
               "models": {"before": "models/before.pt", "after": str(run / "models" / "after.pt")},
               "before": {"mAP50-95": 37.12, "mAP50": 59.34, **row},  # a pipeline records mAP in %
               "after": {"mAP50-95": 36.54, "mAP50": 58.71, **row, "params": 0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    html_path, md_path = write_report([run])
    md, page = md_path.read_text(), html_path.read_text()
    for text in ("test mAP50-95 (%)", "test mAP50 (%)", "37.12", "36.54", "59.34", "58.71"):
        assert text in md and text in page, text
    assert "top-1" not in md
    images = re.findall(r"!\[[^]]*\]\((report_files/[^)]+\.png)\)", md)
    assert "report_files/bccd-l1-detections.png" in images
    image = md_path.parent / "report_files" / "bccd-l1-detections.png"
    from PIL import Image

    with Image.open(image) as im:
        assert im.width > 300 and im.height > 4 * 150  # 4 images x (base, pruned)
    assert page.count("data:image/png;base64,") == len(images)
    png = tools.draw_detections({"base": detector()}, subset, n=2, path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes() == png
    (run / "models" / "after.pt").unlink()  # the report still renders, and says why the images are missing
    _, md_path = write_report([run])
    assert "validation images not drawn" in md_path.read_text()
