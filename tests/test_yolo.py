"""Ultralytics detectors: offline import, building by name, exact traceable rewrite, trusted weights, VOC data.

Every test runs with sockets guarded (``tests/yolo_helpers.py``): a connection (or DNS lookup) to anything but
loopback is recorded and fails the test, here and in the fresh processes the tests start.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)
from prunekit.yolo.data import detection_data, voc_to_yolo  # noqa: E402

from .conftest import BCCD  # noqa: E402
from .yolo_helpers import base, net_attempts, offline, outputs, randomise_bn, run_fresh  # noqa: E402, F401  (net_attempts, offline: the socket guard, one per module)


# ---- offline ----
def test_import_is_offline_and_settings_are_prunekits(tmp_path: Path) -> None:
    """In a fresh interpreter (other tests may have imported Ultralytics into this one already)."""
    run_fresh(f"""
        import os, sys
        from pathlib import Path
        os.environ["PRUNEKIT_CACHE"] = {str(tmp_path / "cache")!r}
        from prunekit import yolo
        assert "ultralytics" not in sys.modules  # prunekit does not import it on its own
        ul = yolo.ultralytics()
        from ultralytics import utils
        from ultralytics.utils import checks, events

        assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_CONFIG_DIR"] == str(yolo.config_dir())
        assert not utils.ONLINE and not utils.is_online() and not checks.AUTOINSTALL and not events.events.enabled
        assert ul.settings["sync"] is False and ul.settings["api_key"] == ""
        assert Path(ul.settings["runs_dir"]).is_relative_to(yolo.config_dir())
        assert Path(checks.check_font("Arial.ttf")).is_file()  # found locally, never downloaded
        assert yolo.ultralytics() is ul
    """, tmp_path)


# ---- building by name ----
def test_names_resolve_to_shipped_yamls() -> None:
    assert [(p.name, s) for p, s in map(yolo.resolve, ["ul:yolov8n", "yolo11s", "ul:yolov3u", "ul:yolov3-tinyu",
                                                       "ul:yolov5nu"])] == [
        ("yolov8.yaml", "n"), ("yolo11.yaml", "s"), ("yolov3.yaml", ""), ("yolov3-tiny.yaml", ""), ("yolov5.yaml", "n")]
    with pytest.raises(PrunekitError, match="did you mean 'ul:yolov8"):
        pk.models.create("ul:yolov8q", num_classes=3)
    with pytest.raises(PrunekitError, match="segment model"):
        pk.models.create("ul:yolov8n-seg", num_classes=3)
    with pytest.raises(PrunekitError, match="does not take in_channels"):
        pk.models.create("ul:yolov8n", num_classes=3, in_channels=1)
    with pytest.raises(PrunekitError, match="multiple of 32"):
        pk.models.create("ul:yolov8n", num_classes=3, imgsz=300)
    assert pk.models.default_input_size("ul:yolov8n") == (3, 640, 640)


def test_create_records_recipe_and_protected_layers() -> None:
    model = base("yolov8n")
    assert model.prunekit_arch == {"name": "ul:yolov8n", "num_classes": 3, "kwargs": {"imgsz": 320},
                                   "input_shape": [3, 320, 320]}
    head = model.model[-1]
    assert head.nc == 3 and len(yolo.head_layers(model)) == 2 * head.nl + 1  # box and class per level, DFL
    assert all(isinstance(m, nn.Conv2d) for m in yolo.head_layers(model))
    names = dict(model.named_modules())
    assert {names[n] for n in model.prunekit_protected} == set(yolo.protected_layers(model))


@pytest.mark.parametrize("name", ["yolov8n", "yolov8s", "yolo11n", "yolov3-tinyu", "yolov3u", "yolov5nu"])
def test_traceable_rewrite_is_exact(name: str) -> None:
    yolo.ultralytics()  # this test imports from Ultralytics itself: offline first, whichever test runs first
    from ultralytics.nn.modules.block import C2PSA, C2f

    torch.manual_seed(0)
    ref = randomise_bn(yolo.build_detection_model(f"ul:{name}", 3))
    new = yolo.make_traceable(copy.deepcopy(ref)).eval()
    assert not any(type(m).forward in (C2f.forward, C2PSA.forward) for m in new.modules())
    a, b = outputs(ref), outputs(new)
    assert [t.shape for t in a] == [t.shape for t in b]
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_weights_from_ultralytics_pickle_need_trust(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = randomise_bn(yolo.build_detection_model("ul:yolov3-tinyu", 3))
    torch.save({"model": trained, "epoch": 3}, tmp_path / "best.pt")  # what Ultralytics' trainer writes
    with pytest.raises(PrunekitError, match="pickle.*trust_pickle=True"):
        pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "best.pt")
    with pytest.raises(PrunekitError, match="predicts 3 classes but num_classes=5; pass num_classes=3"):
        pk.models.create("ul:yolov3-tinyu", num_classes=5, weights_path=tmp_path / "best.pt", trust_pickle=True)
    model = pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "best.pt", trust_pickle=True)
    assert "weights_path" not in model.prunekit_arch["kwargs"] and "trust_pickle" not in model.prunekit_arch["kwargs"]
    for p, q in zip(outputs(trained), outputs(model), strict=True):
        torch.testing.assert_close(q, p)
    torch.save(trained.state_dict(), tmp_path / "state.pt")  # a plain state dict needs no trust
    model = pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "state.pt")
    torch.testing.assert_close(outputs(model)[0], outputs(trained)[0])


# ---- data ----
def _voc(root: Path, images: dict[str, tuple[tuple[int, int], list[tuple]] | None],
         splits: dict[str, list[str]]) -> Path:
    """A tiny VOC directory: per image id its (w, h) and objects (name, xmin, ymin, xmax, ymax[, difficult])."""
    from PIL import Image

    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, spec in images.items():
        size = spec[0] if spec else (64, 48)
        Image.new("RGB", size, (120, 30, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if spec is None:
            continue  # listed, but no annotation file at all
        objs = "".join(
            f"<object><name>{o[0]}</name><difficult>{int(len(o) > 5 and o[5])}</difficult><bndbox>"
            f"<xmin>{o[1]}</xmin><ymin>{o[2]}</ymin><xmax>{o[3]}</xmax><ymax>{o[4]}</ymax></bndbox></object>"
            for o in spec[1])
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>")
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _rows(want: list[list[float]]) -> list:
    """Label rows compared with pytest.approx per row (it does not take nested lists)."""
    return [pytest.approx(row, abs=1e-6) for row in want]


def _labels(data, split: str) -> dict[str, list[list[float]]]:
    folder = data.yaml.parent / "labels" / split
    return {f.stem: [[float(v) for v in ln.split()] for ln in f.read_text().splitlines()]
            for f in sorted(folder.glob("*.txt"))}


def test_voc_edge_cases(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {
        "a": ((100, 50), [("dog", 11, 6, 60, 30), ("cat", 1, 1, 100, 50)]),
        "b": ((100, 50), [("dog", 90, 40, 130, 70), ("dog", -5, 10, 20, 20)]),  # both reach outside: clipped
        "c": ((100, 50), [("cat", 30, 30, 30, 40), ("cat", 120, 10, 140, 20)]),  # zero width; wholly outside
        "d": ((100, 50), [("bird", 10, 10, 20, 20, True), ("cat", 10, 10, 20, 20)]),  # one difficult
        "e": ((100, 50), []),  # an image without objects
        "g": ((100, 50), [("dog", 10, 10, 30, 30), ("dog", 40, 10, 20, 30)]),  # the second has inverted corners
        "h": ((100, 50), [("fish", 10, 10, 30, 30)]),  # a class the training split does not have
    }, {"train": ["a", "b", "c", "d"], "val": ["e", "g", "h"]})
    with pytest.warns(UserWarning, match=r"2 boxes clipped.*\(e\.g\. b\.xml\).*2 boxes dropped with zero "
                                         r"area \(e\.g\. c\.xml\).*1 boxes dropped with inverted corners.*1 difficult.*"
                                         r"1 objects of classes the model does not have"):
        data = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert data.names == ["bird", "cat", "dog"]  # a class stays even where its only object is difficult; no fish
    assert (data.images, data.objects, data.empty_images) == ({"train": 4, "val": 3}, {"train": 5, "val": 1}, 3)
    train = _labels(data, "train")
    assert train["a"] == _rows([[2, 0.345, 0.34, 0.49, 0.48], [1, 0.495, 0.49, 0.99, 0.98]])  # 1-based
    assert train["b"] == _rows([[2, 0.945, 0.89, 0.11, 0.22], [2, 0.095, 0.28, 0.19, 0.2]])
    assert train["c"] == [] and train["d"] == _rows([[1, 0.14, 0.28, 0.1, 0.2]])
    assert _labels(data, "val") == {"e": [], "g": _rows([[2, 0.19, 0.38, 0.2, 0.4]]), "h": []}
    assert sorted(p.name for p in (data.yaml.parent / "images" / "val").iterdir()) == ["e.jpg", "g.jpg", "h.jpg"]
    import yaml

    cfg = yaml.safe_load(data.yaml.read_text())
    assert cfg["train"] == "images/train" and cfg["names"] == {0: "bird", 1: "cat", 2: "dog"} and "test" not in cfg

    stamp = data.yaml.stat().st_mtime_ns  # converted once: a second call reads the cache
    with pytest.warns(UserWarning):
        again = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert again.yaml == data.yaml and again.yaml.stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning, match="5 objects of classes the model does not have"):
        named = detection_data(root, names=["dog", "bird"], keep_difficult=True, cache_dir=tmp_path / "cache")
    assert named.yaml != data.yaml and named.difficult == 0 and named.names == ["dog", "bird"]
    assert _labels(named, "train")["d"] == _rows([[1, 0.14, 0.28, 0.1, 0.2]])
    assert detection_data(named.yaml).names == ["dog", "bird"]  # a YOLO data yaml is taken as it is

    (root / "Annotations" / "e.xml").write_text(  # an edited annotation converts again
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax>"
        "</bndbox></object></annotation>")
    with pytest.warns(UserWarning):
        edited = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert edited.yaml != data.yaml and edited.objects["val"] == 2
    with pytest.raises(PrunekitError, match="not a Pascal VOC directory"):
        voc_to_yolo(tmp_path, cache_dir=tmp_path / "cache")
    (root / "ImageSets" / "Main" / "val.txt").write_text("e\ng\nf\n")  # f: listed without an annotation
    (root / "JPEGImages" / "f.jpg").write_bytes((root / "JPEGImages" / "e.jpg").read_bytes())
    with pytest.raises(PrunekitError, match=r"val\.txt lists 1 image\(s\) without an annotation .*\(e\.g\. f\)"):
        voc_to_yolo(root, cache_dir=tmp_path / "cache")
    (root / "ImageSets" / "Main" / "val.txt").write_text("h\n")  # no object left in a split (h's fish is unknown)
    with pytest.raises(PrunekitError, match="split 'val' has no object left"):
        voc_to_yolo(root, cache_dir=tmp_path / "cache")


def test_bccd_converts_with_counted_fixes(bccd) -> None:
    import re

    data = bccd
    assert data.names == ["Platelets", "RBC", "WBC"]
    assert data.images == {"train": 205, "val": 87, "test": 72}
    listed = [i for s in ("train", "val", "test") for i in (BCCD / "ImageSets/Main" / f"{s}.txt").read_text().split()]
    in_xml = sum(len(re.findall("<object>", (BCCD / "Annotations" / f"{i}.xml").read_text())) for i in listed)
    assert sum(data.objects.values()) + data.dropped_empty + data.difficult + data.unknown_class == in_xml
    assert data.clipped + data.dropped_empty > 0
    for split in data.images:
        for rows in _labels(data, split).values():
            for _, cx, cy, w, h in rows:
                assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx - w / 2 + 1e-6 and cx + w / 2 <= 1 + 1e-6
                assert 0 <= cy - h / 2 + 1e-6 and cy + h / 2 <= 1 + 1e-6
