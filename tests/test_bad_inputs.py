"""Bad input, one row each: the CLI answers with one `prunekit: error:` line and exit code 2 (never a
traceback), and every file that existed before is byte-identical afterwards. Plus the Python API,
run-folder locking, permissions, and property-based tests of config validation and model-file loading."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit as pk
from prunekit import io
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.pipeline import validate

from .conftest import SHARED


def _digits_model(path: Path, **kw) -> Path:
    torch.manual_seed(0)
    pk.save(pk.models.create("digits_cnn", in_channels=1, **kw), path)
    return path


def _edit(path: Path, change: Callable[[dict], None]) -> Path:
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)
    return path


def _config(tmp: Path, **changes) -> Path:
    cfg = {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": str(tmp / "run"),
           "method": {"name": "l1-norm"}, "target": {"speedup": 2.0},
           "stages": [{"stage": "train", "epochs": 1}, {"stage": "prune"}]}
    cfg.update(changes)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _interrupted(tmp: Path) -> Path:
    """A training run directory whose last.pt exists but whose model.pt was never written."""
    out = tmp / "train"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)]) == 0
    (out / "model.pt").unlink()
    return out


def _one_class(tmp: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        (tmp / "one" / split / "cat").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(tmp / "one" / split / "cat" / f"{i}.png")
    return tmp / "one"


# (id, setup(tmp) -> argv, expected text in the error line)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("train-out-is-a-file", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--out",
                                       str(_touch(t / "f"))], "is a file"),
    ("train-into-interrupted-run", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "1",
                                              "--out", str(_interrupted(t))], "interrupted run"),
    ("resume-with-other-settings", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "3",
                                              "--resume", "--out", str(_interrupted(t))],
     "other settings (epochs: 1 in the run, 3 now"),
    ("device-tpu9", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--device", "tpu9",
                               "--out", str(t / "o")], "unknown device 'tpu9'"),
    ("device-gpu", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--device", "gpu",
                              "--out", str(t / "o")], "unknown device 'gpu'"),
    ("lr-diverges", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "2", "--lr", "1e30",
                               "--out", str(t / "o")], "training diverged"),
    ("one-class-data", lambda t: ["train", "--model", "digits_cnn", "--data", str(_one_class(t)), "--out",
                                  str(t / "o")], "fewer than two classes"),
    ("channels-do-not-match-data", lambda t: ["finetune", "--checkpoint", str(_rgb_model(t)), "--data", "digits",
                                              "--out", str(t / "o")], "checking the model against data"),
    ("speedup-nan", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method", "l1-norm",
                               "--speedup", "nan", "--out", str(t / "p.pt")], "speedup must be a finite number"),
    ("unknown-method-option", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                         "l1-norm", "--speedup", "2", "--param", "rankin=global", "--out",
                                         str(t / "p.pt")], "no option rankin"),
    ("option-of-another-method", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                            "l1-norm", "--speedup", "2", "--percentile", "50", "--out",
                                            str(t / "p.pt")], "--percentile is not an option of method 'l1-norm'"),
    ("prune-out-exists", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method", "l1-norm",
                                    "--speedup", "2", "--out", str(_touch(t / "p.pt"))], "already exists"),
    ("prune-out-name-too-long", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                           "l1-norm", "--speedup", "2", "--out", str(t / ("x" * 300 + ".pt"))],
     "too long"),
    ("export-under-a-file", lambda t: ["export", "--checkpoint", str(_digits_model(t / "m.pt")), "--out",
                                       str(_touch(t / "f") / "m.onnx")], "error:"),
    ("crafted-layer-attribute", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["arch"]["layers"][next(iter(o["arch"]["layers"]))].update(
            forward=1)))], "not a layer shape"),
    ("wrong-tensor-shape", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["state"].update({k: torch.zeros(3) for k in list(o["state"])[:1]})))],
     "weights do not fit"),
    ("extra-state-key", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["state"].update({"ghost.weight": torch.zeros(2)})))],
     "weights do not fit"),
    ("foreign-file", lambda t: ["eval", "--checkpoint", str(_foreign(t))], "not a prunekit"),
    ("config-out-null", lambda t: ["run", str(_config(t, out=None))], "config error at 'out'"),
    ("config-model-null", lambda t: ["run", str(_config(t, model=None))], "config error at 'model'"),
    ("config-device-tpu9", lambda t: ["run", str(_config(t, device="tpu9"))], "config error at 'device'"),
    ("config-max-cycles-type", lambda t: ["run", str(_config(t, stages=[{"stage": "cycle", "max_cycles": "three",
                                                                          "stages": [{"stage": "prune"}]}]))],
     "max_cycles"),
    ("config-stop-below-type", lambda t: ["run", str(_config(t, stages=[{"stage": "cycle", "stop_below": [1],
                                                                          "stages": [{"stage": "prune"}]}]))],
     "stop_below"),
    ("config-speedup-for-unstructured", lambda t: ["run", str(_config(t, method={"name": "magnitude"}))],
     "unstructured"),
    ("config-rest-without-budget", lambda t: ["run", str(_config(t, stages=[{"stage": "finetune",
                                                                              "epochs": "rest"}]))], "budget"),
    ("config-missing-data", lambda t: ["run", str(_config(t, data={"name": str(t / "nowhere")}))], "does not exist"),
    ("report-of-a-non-run", lambda t: ["report", str(t)], "not a finished prunekit run"),
    ("compare-unknown-method", lambda t: ["compare", str(_compare(t, methods=["l1-nrom"]))], "unknown method"),
    ("compare-learned-for-l1", lambda t: ["compare", str(_compare(t, targets=["learned"]))], "'learned' is for"),
    ("compare-no-methods", lambda t: ["compare", str(_compare(t, methods=[]))], "the list is empty"),
    ("compare-seed-not-int", lambda t: ["compare", str(_compare(t, seeds=[1.5]))], "integers"),
    ("compare-sparsify-over-budget", lambda t: ["compare", str(_compare(
        t, methods=[{"name": "net-slim", "sparsify": {"epochs": 5}}]))], "do not fit the budget"),
    ("compare-other-config-in-folder", lambda t: ["compare", str(_compare(t, seeds=[1], claimed=True))],
     "holds a compare with another config (differs at: seeds)"),
    ("compare-empty-out", lambda t: ["compare", str(_compare(t)), "--out", ""], "--out is empty"),
    # issue 37: a key with no value, the same distillation twice, bad budgets: one line before any cell
    ("compare-name-null", lambda t: ["compare", str(_compare(t, name=None))], "at 'name': has no value"),
    ("compare-base-seed-null", lambda t: ["compare", str(_compare(
        t, base={"model": {"name": "digits_cnn"}, "seed": None}))], "at 'base.seed': has no value"),
    ("compare-latency-batch-null", lambda t: ["compare", str(_compare(t, latency={"batch": None}))],
     "at 'latency.batch': has no value"),
    ("compare-search-epochs-null", lambda t: ["compare", str(_compare(
        t, methods=[{"name": "l1-norm", "search_epochs": None}]))], "search_epochs': has no value"),
    ("compare-distill-twice", lambda t: ["compare", str(_compare(t, distill=[None, None]))], "appears twice"),
    ("compare-budgets-negative", lambda t: ["compare", str(_compare(t, budgets=[-1]))], "not a number of epochs"),
    ("compare-budgets-empty", lambda t: ["compare", str(_compare(t, budgets=[]))], "budgets"),
    # issue 26: trust only from the caller, values beyond their type, nothing silently accepted
    ("recipe-names-weights-path-and-trust", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["arch"]["kwargs"].update(
            weights_path=str(_marker_pickle(t)), trust_pickle=True)))], "never a file to open or a trust flag"),
    ("recipe-kwarg-of-wrong-type", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["arch"]["kwargs"].update(in_channels="1; import os")))],
     "is corrupt (architecture field kwargs"),
    ("recipe-huge-input-shape", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["arch"].update(input_shape=[1, 200000, 200000])))],
     "too large for any model input"),
    ("nan-weights", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["state"].update({k: torch.full_like(v, float("nan")) for k, v in
                                                                o["state"].items() if v.is_floating_point()})))],
     "NaN or infinite"),
    ("int64-weight", lambda t: ["eval", "--checkpoint", str(_edit(
        _digits_model(t / "m.pt"), lambda o: o["state"].update(
            {k: v.long() for k, v in list(o["state"].items())[:1]})))],
     "not floating point"),
    ("train-resume-finished", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "1",
                                         "--resume", "--out", str(_finished_train(t))], "holds a finished run"),
    ("train-resume-missing", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--resume", "--out",
                                        str(t / "nothing")], "no interrupted run to resume"),
    ("train-resume-and-force", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--resume", "--force",
                                          "--out", str(_interrupted(t))], "give one of them"),
    ("train-out-empty", lambda t: ["train", "--model", "digits_cnn", "--data", "digits", "--out", ""],
     "--out is empty"),
    ("run-out-empty", lambda t: ["run", str(_config(t)), "--out", ""], "--out is empty"),
    ("prune-percentile-and-speedup", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                                "net-slim", "--percentile", "50", "--speedup", "2", "--out",
                                                str(t / "p.pt")], "give one of them"),
    ("prune-speedup-one", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method", "l1-norm",
                                     "--speedup", "1.0", "--out", str(t / "p.pt")], "removes nothing"),
    ("prune-negative-option", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                         "dist-fit", "--speedup", "2", "--param", "tol=-1", "--out", str(t / "p.pt")],
     "option tol must be >= 0, got -1"),
    ("prune-negative-search-seed", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                              "auto-mend", "--speedup", "2", "--param", "seed=-5", "--out",
                                              str(t / "p.pt")], "option seed must be in [0, 4294967295], got -5"),
    ("export-onnx-gzip", lambda t: ["export", "--checkpoint", str(_digits_model(t / "m.pt")), "--format", "onnx",
                                    "--gzip", "--out", str(t / "m.onnx")], "--gzip compresses the sparse format only"),
    ("finetune-on-other-classes", lambda t: ["finetune", "--checkpoint", str(_digits_model(t / "m.pt")), "--data",
                                             str(_two_class(t)), "--image-size", "8", "--out", str(t / "o")],
     "predicts 10 classes"),
    ("config-duplicate-key", lambda t: ["run", str(_text(t / "c.yaml", "model: {name: digits_cnn}\n"
                                                                      "model: {name: resnet20}\n"))],
     "key 'model' is given twice"),
    ("config-alias-bomb", lambda t: ["run", str(_text(t / "c.yaml", _BOMB))], "expands to more than"),
    ("config-huge-seed", lambda t: ["run", str(_config(t, seed=2 ** 40))], "config error at 'seed'"),
    ("config-weight-decay-negative", lambda t: ["run", str(_config(
        t, stages=[{"stage": "train", "epochs": 1, "weight_decay": -1}]))], "weight_decay=-1"),
    ("config-tolerance-nan", lambda t: ["run", str(_text(t / "c.yaml", yaml.safe_dump(
        {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": str(t / "run"),
         "method": {"name": "l1-norm"}, "target": {"speedup": 2.0}}) + "stages: [{stage: cycle, tolerance: .nan, "
                                                                         "stages: [{stage: prune}]}]\n"))],
     "tolerance"),
    ("config-stop-below-two", lambda t: ["run", str(_config(t, stages=[{"stage": "cycle", "stop_below": 2,
                                                                         "stages": [{"stage": "prune"}]}]))],
     "stop_below"),
    ("config-image-size-zero", lambda t: ["run", str(_config(t, data={"name": "digits", "image_size": 0}))],
     "data.image_size"),
    ("config-num-classes-zero", lambda t: ["run", str(_config(t, model={"name": "digits_cnn", "num_classes": 0}))],
     "model.num_classes"),
    ("config-name-and-checkpoint", lambda t: ["run", str(_config(
        t, model={"name": "digits_cnn", "checkpoint": str(_digits_model(t / "m.pt"))}))], "not both"),
    ("report-garbage-metrics", lambda t: ["report", str(_garbage_run(t))], "is damaged"),
    ("compare-yaml-binary", lambda t: ["compare", str(_damaged_compare(t, b"\x00\xff\xfe binary"))], "is damaged"),
    ("compare-yaml-a-list", lambda t: ["compare", str(_damaged_compare(t, b"[1, 2]\n"))], "is damaged"),
    ("compare-into-a-pipeline-run", lambda t: ["compare", str(_compare_into_run(t))], "pipeline run's folder"),
    ("compare-int8-bad-method", lambda t: ["compare", str(_compare(t, int8={"method": "magic"}))], "int8.method"),
    ("export-int8-without-data", lambda t: ["export", "--checkpoint", str(_digits_model(t / "m.pt")), "--int8",
                                            "--out", str(t / "m.onnx")], "give --data"),
    ("export-int8-out-not-onnx", lambda t: ["export", "--checkpoint", str(_digits_model(t / "m.pt")), "--int8",
                                            "--data", "digits", "--out", str(t / "m.bin")], "must end in .onnx"),
    ("config-latency-nan", lambda t: ["run", str(_text(t / "c.yaml", yaml.safe_dump(
        {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": str(t / "run"),
         "method": {"name": "l1-norm"}, "stages": [{"stage": "train", "epochs": 1}, {"stage": "prune"}]})
        + "target: {latency: .nan}\n"))], "target.latency"),
    ("config-distill-teacher-pickle", lambda t: ["run", str(_config(t, stages=[
        {"stage": "train", "epochs": 1}, {"stage": "prune"},
        {"stage": "finetune", "epochs": 1, "distill": {"teacher": str(_marker_pickle(t))}}]))], "distill.teacher"),
    ("latency-batch-a-billion", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                           "l1-norm", "--latency", "2", "--batch", "1000000000", "--out",
                                           str(t / "p.pt")], "batch 1000000000 needs"),
    ("latency-unknown-runtime", lambda t: ["prune", "--checkpoint", str(_digits_model(t / "m.pt")), "--method",
                                           "l1-norm", "--latency", "2", "--runtime", "tensorrt", "--out",
                                           str(t / "p.pt")], "unknown runtime 'tensorrt'"),
]

# Detector rows run the CLI in a fresh process: Ultralytics, once imported, stays configured for the process,
# and tests/test_yolo.py checks that its own first import is the offline one.
DETECT_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("detect-settings-prunekit-key", lambda t: ["run", str(_detect_config(t, {"lr": 0.1}))], "lr0"),
    ("detect-settings-unknown-key", lambda t: ["run", str(_detect_config(t, {"bogus_key": 1}))],
     "'bogus_key' is not a valid YOLO argument"),
    ("detect-settings-bad-value", lambda t: ["run", str(_detect_config(t, {"lr0": -1}))], "invalid value"),
    ("detect-settings-epochs", lambda t: ["run", str(_detect_config(t, {"epochs": 5}))], "set by prunekit"),
    ("detect-settings-project", lambda t: ["run", str(_detect_config(t, {"project": str(t)}))], "set by prunekit"),
    ("detect-data-yaml-random-bytes", lambda t: ["run", str(_detect_config(t, {}, data=_random_bytes(t)))],
     "is not valid YAML"),
    ("detect-labels-in-pixels", lambda t: ["run", str(_detect_config(t, {}, data=_yolo_folder(t, "0 120 80 30 20")))],
     "not pixels"),
    ("detect-label-nan", lambda t: ["run", str(_detect_config(t, {}, data=_yolo_folder(t, "0 nan 0.5 0.1 0.1")))],
     "nan or inf"),
    ("detect-label-bad-class", lambda t: ["run", str(_detect_config(t, {}, data=_yolo_folder(t, "7 0.5 0.5 0.1 0.1")))],
     "class id 7"),
    ("detect-voc-image-is-text", lambda t: ["run", str(_detect_config(t, {}, data=_voc(t, text_image=True)))],
     "is not a readable image"),
    ("detect-voc-all-inverted", lambda t: ["run", str(_detect_config(t, {}, data=_voc(t, inverted=True)))],
     "no object left"),
    ("detect-voc-missing-xml", lambda t: ["run", str(_detect_config(t, {}, data=_voc(t, missing_xml=True)))],
     "without an annotation"),
]

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)) + \
    "model: {name: digits_cnn}\ndata: {name: digits}\nout: run\nseed: *h\nstages: [{stage: prune}]\n"


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _marker_pickle(tmp: Path) -> Path:
    """A pickle that creates ``tmp/MARKER`` if anything ever unpickles it."""
    class Plant:
        def __reduce__(self):
            return (open, (str(tmp / "MARKER"), "w"))

    import pickle

    path = tmp / "plant.pt"
    path.write_bytes(pickle.dumps(Plant()))
    return path


def _finished_train(tmp: Path) -> Path:
    out = tmp / "done"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)]) == 0
    return out


def _two_class(tmp: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp / "two" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp / "two" / split / c / f"{i}.png")
    return tmp / "two"


def _garbage_run(tmp: Path) -> Path:
    (tmp / "g").mkdir()
    (tmp / "g" / "metrics.json").write_text("{not json")
    return tmp / "g"


def _detect_config(tmp: Path, settings: dict, data: str | Path = SHARED / "bccd") -> Path:
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64}, "out": str(tmp / "run"),
           "stages": [{"stage": "train", "epochs": 1, **({"ultralytics": settings} if settings else {})}]}
    path = tmp / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _random_bytes(tmp: Path) -> Path:
    (tmp / "data.yaml").write_bytes(bytes(range(256)) * 4)
    return tmp / "data.yaml"


def _yolo_folder(tmp: Path, label: str) -> Path:
    from PIL import Image

    for split in ("train", "val", "test"):
        (tmp / "yolo" / "images" / split).mkdir(parents=True)
        (tmp / "yolo" / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (64, 48), (90, 30, 10)).save(tmp / "yolo" / "images" / split / "a.jpg")
        (tmp / "yolo" / "labels" / split / "a.txt").write_text(label + "\n")
    (tmp / "yolo" / "data.yaml").write_text(yaml.safe_dump({"path": str(tmp / "yolo"), "train": "images/train",
                                                            "val": "images/val", "test": "images/test",
                                                            "names": {0: "cell"}}))
    return tmp / "yolo" / "data.yaml"


def _voc(tmp: Path, *, text_image: bool = False, inverted: bool = False, missing_xml: bool = False) -> Path:
    from PIL import Image

    root = tmp / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for i, split in enumerate(("train", "val", "test")):
        name = f"im{i}"
        if text_image and split == "val":
            (root / "JPEGImages" / f"{name}.jpg").write_text("not an image")
        else:
            Image.new("RGB", (64, 48), (90, 30, 10)).save(root / "JPEGImages" / f"{name}.jpg")
        x0, x1 = (40, 10) if inverted and split == "val" else (10, 40)
        if not (missing_xml and split == "test"):
            (root / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><object><name>cell</name><bndbox><xmin>{x0}</xmin><ymin>5</ymin><xmax>{x1}</xmax>"
                "<ymax>30</ymax></bndbox></object></annotation>")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(name + "\n")
    return root


def _compare(tmp: Path, claimed: bool = False, **changes) -> Path:
    """A small compare config; ``claimed``: its out folder already holds another compare's config."""
    cfg = {"data": {"name": "digits"}, "base": {"model": {"name": "digits_cnn"}, "train": {"epochs": 1}},
           "methods": ["l1-norm"], "targets": [2.0], "seeds": [0], "budget": 1, "out": str(tmp / "cmp")}
    if claimed:
        from prunekit.compare import validate as validate_compare

        (tmp / "cmp").mkdir()
        (tmp / "cmp" / "compare.yaml").write_text(yaml.safe_dump(validate_compare(dict(cfg, out=str(tmp / "cmp")))))
    cfg.update(changes)
    path = tmp / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _damaged_compare(tmp: Path, content: bytes) -> Path:
    """A compare whose folder holds a damaged compare.yaml."""
    path = _compare(tmp, claimed=True)
    (tmp / "cmp" / "compare.yaml").write_bytes(content)
    return path


def _compare_into_run(tmp: Path) -> Path:
    """A compare whose out folder is a pipeline run's."""
    (tmp / "cmp" / "stages").mkdir(parents=True)
    (tmp / "cmp" / "config.yaml").write_text("name: run\n")
    return _compare(tmp)


def _touch(path: Path) -> Path:
    path.write_text("precious")
    return path


def _rgb_model(tmp: Path) -> Path:
    pk.save(pk.models.create("digits_cnn", in_channels=3), tmp / "rgb.pt")
    return tmp / "rgb.pt"


def _foreign(tmp: Path) -> Path:
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.pt")
    return tmp / "foreign.pt"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path, capsys, monkeypatch):
    _, setup, expected = case
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    rc = main(argv)  # an exception escaping here is a traceback for the user: the test fails on it
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.startswith("prunekit: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed was touched
    assert not (tmp_path / "MARKER").exists()  # no planted pickle was opened


@pytest.mark.parametrize("case", DETECT_CASES, ids=[c[0] for c in DETECT_CASES])
def test_bad_detection_input_is_one_clear_line_and_changes_nothing(case, tmp_path):
    _, setup, expected = case
    argv = setup(tmp_path)
    before = _snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "prunekit", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, env={**os.environ, "PRUNEKIT_CACHE": str(tmp_path / "cache")})
    lines = [x for x in r.stderr.splitlines() if x.startswith("prunekit: error:")]
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("argv", [["eval", "--checkpoint", "m.pt", "--repeats", "0"],
                                  ["eval", "--checkpoint", "m.pt", "--threads", "-1"],
                                  ["export", "--checkpoint", "m.pt", "--out", "x.onnx", "--opset", "99"],
                                  ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "-1",
                                   "--out", "o"],
                                  ["train", "--model", "digits_cnn", "--data", "digits", "--seed", "-1", "--out", "o"],
                                  ["train", "--model", "digits_cnn", "--data", "digits", "--seed", str(2 ** 32),
                                   "--out", "o"],
                                  ["train", "--model", "digits_cnn", "--data", "digits", "--weight-decay", "-1",
                                   "--out", "o"]])
def test_bad_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("call, expected", [
    (lambda: pk.load(None), "must be a string or Path"),
    (lambda: pk.prune("resnet20", "l1-norm", torch.randn(1, 3, 32, 32), speedup=2.0), "nn.Module"),
    (lambda: pk.prune(pk.models.create("resnet20"), "l1-norm", torch.randn(1, 3, 32, 32), speedup="2"),
     "finite number"),
    (lambda: pk.measure(pk.models.create("resnet20"), torch.randn(1, 1, 8, 8)), "does not run on an input"),
    (lambda: pk.data.load(None), "data set must be a name"),
    (lambda: pk.save("not a model", "x.pt"), "nn.Module"),
    (lambda: pk.prune(pk.models.create("resnet20", num_classes=10).to("meta"), "l1-norm",
                      torch.randn(1, 3, 32, 32), speedup=2.0), "meta device"),
    (lambda: pk.prune(_nan(pk.models.create("resnet20")), "l1-norm", torch.randn(1, 3, 32, 32), speedup=2.0),
     "NaN or infinite"),
    (lambda: pk.measure(pk.models.create("resnet20").to("meta"), torch.randn(1, 3, 32, 32)), "meta device"),
])
def test_python_api_raises_one_prunekit_error(call, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrunekitError, match=expected):
        call()


def _nan(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def test_a_full_disk_inside_torch_save_is_one_error_and_no_partial_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed (unexpected pos)")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(PrunekitError, match="cannot write .*m.pt: PytorchStreamWriter failed writing file") as e:
        pk.save(pk.models.create("digits_cnn", in_channels=1), tmp_path / "m.pt")
    assert "enforce fail" not in str(e.value) and "free space" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_re_run_is_a_no_op_that_says_so(tmp_path, capsys):
    cfg = yaml.safe_load(_config(tmp_path, stages=[{"stage": "train", "epochs": 1}]).read_text())
    pk.pipeline.run(cfg)
    files = _snapshot(tmp_path / "run")
    capsys.readouterr()
    again = pk.pipeline.run(cfg)
    assert "finished run of this config; nothing to do" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == files and again["after"] == json.loads(
        (tmp_path / "run" / "metrics.json").read_text())["after"]


def test_a_run_name_never_writes_outside_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep-channels.png").write_text("precious")
    (tmp_path / "a" / "b").mkdir(parents=True)
    cfg = yaml.safe_load(_config(tmp_path, name="../../keep", out=str(tmp_path / "a" / "b" / "run")).read_text())
    cfg["stages"] = [{"stage": "train", "epochs": 1}, {"stage": "prune"}]
    pk.pipeline.run(cfg)
    assert (tmp_path / "keep-channels.png").read_text() == "precious"
    inside = tmp_path / "a" / "b" / "run"
    assert all(inside in p.parents for p in tmp_path.rglob("*.png") if p.name != "keep-channels.png")


def test_one_writer_per_run_folder_and_a_killed_writer_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    with io.run_lock(out):
        rc = main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "1", "--out", str(out)])
    assert rc == 2 and "is being written by prunekit pid" in capsys.readouterr().err
    code = f"import os, prunekit.io as io\nwith io.run_lock({str(out)!r}):\n    os.kill(os.getpid(), 9)\n"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -9
    with io.run_lock(out):  # the killed writer's lock went with its process
        pass


def test_failed_start_does_not_claim_the_folder(tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, data={"name": str(tmp_path / "nowhere")}).read_text())
    with pytest.raises(PrunekitError, match="does not exist"):
        pk.pipeline.run(cfg)
    assert not (tmp_path / "run").exists()
    cfg["data"] = {"name": "digits"}
    cfg["stages"] = [{"stage": "train", "epochs": 1, "lr": 0.05}]
    pk.pipeline.run(cfg)  # the same folder is free for a good config


def test_files_keep_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _digits_model(tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                              inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["model", "data", "method", "target", "stages", "out", "device", "seed", "budget"]),
       value=_values)
def test_config_validation_never_raises_anything_but_a_clear_error(section, value):
    cfg = {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": "x",
           "method": {"name": "l1-norm"}, "target": {"speedup": 2.0}, "stages": [{"stage": "prune"}]}
    cfg[section] = value
    try:
        validate(cfg)
    except PrunekitError:
        pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("hyp") / "m.pt"
    _digits_model(path)
    return torch.load(path, weights_only=True)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["format", "version", "arch", "state", "arch.name", "arch.kwargs", "arch.layers",
                              "arch.identities", "arch.num_classes", "layer", "tensor"]), value=_values)
def test_model_file_loading_never_raises_anything_but_a_clear_error(saved, where, value, tmp_path_factory):
    import copy

    obj = copy.deepcopy(saved)
    if where == "layer":
        obj["arch"]["layers"][next(iter(obj["arch"]["layers"]))] = value
    elif where == "tensor":
        obj["state"][next(iter(obj["state"]))] = value
    elif "." in where:
        obj["arch"][where.split(".")[1]] = value
    else:
        obj[where] = value
    path = tmp_path_factory.mktemp("hyp") / "bad.pt"
    torch.save(obj, path)
    try:
        pk.load(path)
    except PrunekitError:
        pass


@pytest.mark.parametrize("value", ["no", 1, "yes", [True]])
def test_trust_pickle_takes_only_true_or_false(value, tmp_path):
    """Issue 37 item 1b: a truthy value that is not True must not unpickle (the file is never opened)."""
    from prunekit import yolo

    marker = tmp_path / "payload-ran"
    path = tmp_path / "best.pt"
    path.write_bytes(b"not read")
    with pytest.raises(PrunekitError, match="trust_pickle must be True or False"):
        yolo.load_weights(torch.nn.Linear(1, 1), path, 3, trust_pickle=value)
    assert not marker.exists()


def _bad_key(kind: str, path: Path) -> None:
    if kind == "dev-null-link":
        path.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes({"empty": b"", "one-byte": b"k", "world-readable": os.urandom(32)}[kind])
        os.chmod(path, 0o644 if kind == "world-readable" else 0o600)


@pytest.mark.parametrize("kind", ["empty", "one-byte", "dev-null-link", "fifo", "world-readable"])
def test_a_signing_key_that_would_make_signatures_forgeable_is_refused(kind, tmp_path, monkeypatch):
    """Issue 37 item 1a: the key is checked on every use (regular file, this user's, 0600, 32 bytes); nothing is
    signed or trusted with a bad one, and a FIFO does not hang."""
    from prunekit import files

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    _bad_key(kind, tmp_path / "signing.key")
    target = tmp_path / "model.pt"
    target.write_bytes(b"payload")
    with pytest.raises(PrunekitError, match="signing key .* remove it") as err:
        files.file_signature(target)
    assert "\n" not in str(err.value)
    with pytest.raises(PrunekitError):
        files.signed_by_us(target, "0" * 64)


def test_the_signing_key_is_made_whole_and_a_non_ascii_signature_is_a_refusal(tmp_path, monkeypatch):
    from prunekit import files

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    target = tmp_path / "model.pt"
    target.write_bytes(b"weights")
    sig = files.file_signature(target)
    key = tmp_path / "signing.key"
    assert key.stat().st_size == 32 and oct(key.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".signing.key.")]  # no temporary left
    assert files.signed_by_us(target, sig)
    assert not files.signed_by_us(target, "é" * 64) and not files.signed_by_us(target, sig[:-1] + "x")
