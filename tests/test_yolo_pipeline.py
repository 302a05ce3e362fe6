"""Ultralytics detectors through pipelines and the CLI: a detector run end to end, unstructured zeros through a
finetune, a config naming only a detector checkpoint, every CLI command on a detector file, my trained detector on
my folder (sockets guarded, as in ``tests/yolo_helpers.py``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit import pipeline
from prunekit.errors import PrunekitError
from prunekit.measure import count_macs

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)

from .conftest import BCCD  # noqa: E402
from .yolo_helpers import net_attempts, offline, outputs, randomise_bn, subset_yaml  # noqa: E402, F401  (net_attempts, offline: the socket guard, one per module)


def test_pipeline_runs_a_detector_end_to_end(bccd, tmp_path: Path) -> None:
    """sparsify → prune → finetune on a detector: Ultralytics trains prunekit's model, mAP is the metric."""
    data = subset_yaml(bccd, tmp_path, {"train": 16, "val": 8, "test": 8})
    assert yolo.data.detection_data(data).images == {"train": 16, "val": 8, "test": 8}
    fast = {"workers": 0, "plots": False, "val": True}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 160, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "net-slim"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "sparsify", "epochs": 1, "s": 1e-3, "ultralytics": fast}, {"stage": "prune"},
                      {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    assert metrics["task"] == "detect" and metrics["metric"] == "mAP50-95"
    before, after = metrics["before"], metrics["after"]
    assert before["macs"] / after["macs"] == pytest.approx(1.5, rel=0.03)
    assert all(0 <= r[k] <= 100 for r in (before, after) for k in ("mAP50", "mAP50-95"))
    pruned = pk.load(metrics["models"]["after"])
    assert count_macs(pruned, torch.zeros(1, 3, 160, 160)) == after["macs"]
    assert [p.name for p in sorted((tmp_path / "run" / "stages").iterdir())] == [
        "01-sparsify", "02-prune", "03-finetune"]
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test"] == 8
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    curve = [r for r in log if "epoch" in r and "val_mAP50-95" in r]  # the report's curve: one row per epoch
    assert [r["epoch"] for r in curve] == [1, 1]  # sparsify's and finetune's; best.pt's final evaluation is not one
    again = pipeline.run(cfg)  # finished stages are skipped, the same models come back
    assert again["after"]["macs"] == after["macs"]
    with pytest.raises(PrunekitError, match="under 'ultralytics:'"):
        pipeline.validate(cfg | {"stages": [{"stage": "train", "epochs": 1, "lr": 0.1}]})
    with pytest.raises(PrunekitError, match="task must be detect"):
        pipeline.validate(cfg | {"task": "classify"})


def test_unstructured_zeros_stay_zero_through_a_detector_finetune(bccd, tmp_path: Path) -> None:
    """magnitude on a detector: Ultralytics' fine-tune (AdamW, its EMA, best.pt) must not revive a zero."""
    data = subset_yaml(bccd, tmp_path, {"train": 16, "val": 8, "test": 8})
    fast = {"workers": 0, "plots": False, "val": True, "optimizer": "AdamW", "lr0": 0.01}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 160, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "magnitude"}, "target": {"sparsity": 0.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    pruned = pk.load(tmp_path / "run" / "stages" / "01-prune" / "model.pt")
    tuned = dict(pk.load(metrics["models"]["after"]).named_parameters())
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    assert sum(int(z.sum()) for z in zeros.values()) > 0.4 * sum(z.numel() for z in zeros.values())
    assert all(bool((tuned[n][z] == 0).all()) for n, z in zeros.items())
    assert any(not torch.equal(tuned[n], p) for n, p in pruned.named_parameters())  # and it did train


def test_a_config_that_names_only_a_detector_checkpoint_runs_the_detection_task(bccd, tmp_path: Path) -> None:
    """No `task:` needed: the model name the file records says it (a compare's checkpoint base too)."""
    from prunekit import compare

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    base = tmp_path / "base.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=3, imgsz=64), base)
    run = {"model": {"checkpoint": str(base)}, "data": {"name": str(data), "image_size": 64},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"}]}
    assert pipeline.validate(dict(run))["task"] == "detect"
    with pytest.raises(PrunekitError, match="task must be detect"):
        pipeline.validate({**run, "model": {"name": "ul:yolov3-tinyu"}, "task": "classify"})
    cmp = compare.validate({"base": {"checkpoint": str(base)}, "data": {"name": str(data), "image_size": 64},
                            "methods": ["l1-norm"], "targets": [1.5], "seeds": [0], "budget": 1,
                            "out": str(tmp_path / "cmp")})
    assert compare._base_config(cmp, tmp_path / "cmp")["task"] == "detect"
    assert {c["config"]["task"] for c in compare._cells(cmp, compare._entries(cmp), tmp_path / "cmp")} == {"detect"}


def test_every_cli_command_takes_a_detector_file(bccd, tmp_path: Path, capsys) -> None:
    """prune (data-free and with --data), export --format onnx, eval, finetune (with --distill) on a ul: file."""
    from prunekit.cli import main

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    base = tmp_path / "base.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=3, imgsz=64), base)
    assert main(["prune", "--checkpoint", str(base), "--method", "l1-norm", "--speedup", "1.5", "--out",
                 str(tmp_path / "p.pt")]) == 0
    assert main(["prune", "--checkpoint", str(base), "--method", "imp-sim", "--speedup", "1.5", "--data", str(data),
                 "--out", str(tmp_path / "q.pt")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "p.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "p.onnx")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "p.pt"), "--data", str(data), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP50"] <= 1
    assert main(["finetune", "--checkpoint", str(tmp_path / "p.pt"), "--data", str(data), "--epochs", "1",
                 "--batch-size", "8", "--distill", str(base), "--out", str(tmp_path / "ft")]) == 0
    tuned = pk.load(tmp_path / "ft" / "model.pt")
    assert count_macs(tuned, torch.zeros(1, 3, 64, 64)) == count_macs(pk.load(tmp_path / "p.pt"),
                                                                      torch.zeros(1, 3, 64, 64))


def _trained_pt(path: Path, names: list[str]) -> Path:
    """What Ultralytics' trainer writes: a pickled DetectionModel with its class names (BN randomised: 'trained')."""
    torch.manual_seed(3)
    net = randomise_bn(yolo.build_detection_model("ul:yolov3-tinyu", len(names)))
    net.names = dict(enumerate(names))
    torch.save({"model": net, "epoch": 5}, path)
    return path


def _folders_from_bccd(root: Path, n: int = 24) -> dict[str, Path]:
    """The same BCCD images as a LabelImg VOC folder and as a YOLO txt folder with classes.txt, neither split."""
    import shutil
    import xml.etree.ElementTree as ET

    from PIL import Image

    ids = sorted(p.stem for p in (BCCD / "Annotations").glob("*.xml"))[:n]
    voc, yl = root / "labelimg", root / "yolo"
    order = ["RBC", "WBC", "Platelets"]
    for d in (voc / "annotations", voc / "images", yl / "images", yl / "labels"):
        d.mkdir(parents=True)
    for i in ids:
        shutil.copyfile(BCCD / "Annotations" / f"{i}.xml", voc / "annotations" / f"{i}.xml")
        for d in (voc / "images", yl / "images"):
            shutil.copyfile(BCCD / "JPEGImages" / f"{i}.jpg", d / f"{i}.jpg")
        with Image.open(BCCD / "JPEGImages" / f"{i}.jpg") as im:
            w, h = im.size
        rows = []
        for obj in ET.parse(BCCD / "Annotations" / f"{i}.xml").getroot().iter("object"):
            x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
            if x1 > x0 and y1 > y0:
                rows.append(f"{order.index(obj.findtext('name'))} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                            f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
        (yl / "labels" / f"{i}.txt").write_text("".join(rows))
    (yl / "labels" / "classes.txt").write_text("\n".join(order) + "\n")
    return {"labelimg": voc, "yolo": yl}


@pytest.mark.parametrize("layout", ["labelimg", "yolo"])
def test_pipeline_prunes_my_trained_detector_on_my_folder(layout: str, tmp_path: Path, capsys) -> None:
    """A user's Ultralytics best.pt on a folder without splits: a seeded split is made and kept with the run,
    the detector keeps its trained weights and classes, prune -> 1-epoch fine-tune runs; other classes refused."""
    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    folder = _folders_from_bccd(tmp_path)[layout]
    names = ["Platelets", "RBC", "WBC"] if layout == "labelimg" else ["RBC", "WBC", "Platelets"]
    best = _trained_pt(tmp_path / "best.pt", names)
    fast = {"workers": 0, "plots": False, "val": True}
    cfg = {"model": {"name": f"ul:{best}", "trust_pickle": True}, "out": str(tmp_path / "run"),
           "data": {"name": str(folder), "image_size": 160, "batch_size": 8, "calibration_batches": 1},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5},
           "stages": [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)
    assert sum(metrics["split"].values()) == 24 and all(metrics["split"].values())
    err = capsys.readouterr().err  # every split's images and boxes are said at load, changed or not
    assert all(f"prunekit: data {s}: {metrics['split'][s]} images" in err for s in ("train", "val", "test"))
    assert sorted(p.name for p in (tmp_path / "run" / "splits").iterdir()) == ["test.txt", "train.txt", "val.txt"]
    before = pk.load(metrics["models"]["before"])
    trained = torch.load(best, weights_only=False)["model"]
    x = torch.rand(1, 3, 160, 160)
    torch.testing.assert_close(outputs(before, x)[0], outputs(trained, x)[0])  # its weights, not fresh ones
    _trained_pt(tmp_path / "other.pt", names[::-1])
    with pytest.raises(PrunekitError, match="was trained on classes"):
        pipeline.run(cfg | {"model": {"name": f"ul:{tmp_path / 'other.pt'}", "trust_pickle": True},
                            "out": str(tmp_path / "run2")})
    with pytest.raises(PrunekitError, match="trust_pickle"):
        pipeline.run(cfg | {"model": {"name": f"ul:{best}"}, "out": str(tmp_path / "run3")})


def test_cli_prunes_my_trained_detector(tmp_path: Path, capsys) -> None:
    from prunekit.cli import main

    best = _trained_pt(tmp_path / "best.pt", ["a", "b", "c"])
    out = tmp_path / "pruned.pt"
    args = ["prune", "--model", f"ul:{best}", "--method", "l1-norm", "--speedup", "1.5", "--image-size", "160",
            "--out", str(out)]
    assert main(args) == 2 and "trust_pickle" in capsys.readouterr().err  # a pickle is opened only when trusted
    assert main([*args, "--trust-pickle"]) == 0
    pruned = pk.load(out)
    assert pruned.prunekit_arch["name"] == "ul:yolov3-tinyu" and pruned.prunekit_arch["input_shape"] == [3, 160, 160]
    assert main(["prune", "--model", "ul:yolov8n", "--method", "l1-norm", "--speedup", "1.5", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "--model takes ul:path/to/best.pt" in capsys.readouterr().err
