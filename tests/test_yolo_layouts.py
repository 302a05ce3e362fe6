"""Detection data as users have it: LabelImg VOC folders and YOLO txt folders, with or without splits.

Built from 30 real BCCD images in tmp_path; conversion only (no Ultralytics, no training), a few seconds.
"""

from __future__ import annotations

import shutil
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from prunekit.errors import PrunekitError
from prunekit.yolo.data import SPLITS, DetectionData, detection_data, voc_to_yolo

from .conftest import SHARED

BCCD = SHARED / "bccd"
N = 30
pytestmark = pytest.mark.skipif(not BCCD.is_dir(), reason=f"shared BCCD copy not found at {BCCD}")


def _ids(n: int = N) -> list[str]:
    return sorted(p.stem for p in (BCCD / "Annotations").glob("*.xml"))[:n]


def _labelimg(root: Path, ids: list[str]) -> Path:
    """LabelImg's VOC layout (annotations/ + images/, no ImageSets) with BCCD's XMLs: a rare class 'Eos' in three
    images, one box with swapped corners (ids[5]), one of zero width (ids[7]), one image without an XML."""
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for k, i in enumerate(ids):
        shutil.copyfile(BCCD / "JPEGImages" / f"{i}.jpg", root / "images" / f"{i}.jpg")
        tree = ET.parse(BCCD / "Annotations" / f"{i}.xml")
        box = tree.getroot().find("object/bndbox")
        if k in (3, 13, 23):
            tree.getroot().find("object/name").text = "Eos"
        if k == 5:
            box.find("xmin").text, box.find("xmax").text = box.find("xmax").text, box.find("xmin").text
        if k == 7:
            box.find("xmax").text = box.find("xmin").text
        tree.write(root / "annotations" / f"{i}.xml")
    shutil.copyfile(BCCD / "JPEGImages" / "BloodImage_00100.jpg", root / "images" / "unlabelled.jpg")
    return root


def _yolo_rows(image_id: str, names: list[str]) -> list[str]:
    """BCCD's boxes of one image as YOLO label lines (VOC's 1-based pixels to fractions of the image)."""
    with Image.open(BCCD / "JPEGImages" / f"{image_id}.jpg") as im:
        w, h = im.size
    rows = []
    for obj in ET.parse(BCCD / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
        x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
        rows.append(f"{names.index(obj.findtext('name'))} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                    f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
    return rows


def _yolo(root: Path, ids: list[str], names: list[str] | None, split_of: Callable[[int], str] | None = None,
          pixels: tuple[int, ...] = (), unlabelled: tuple[int, ...] = (),
          folders: tuple[str, str] = ("images", "labels")) -> Path:
    """A YOLO txt folder (images/ + labels/, in split subfolders when ``split_of`` names each image's split) with
    ``classes.txt`` in labels/ as LabelImg writes it; ``pixels``: images whose labels are in pixels; ``unlabelled``:
    images without a label file."""
    images, labels = root / folders[0], root / folders[1]
    for k, i in enumerate(ids):
        sub = split_of(k) if split_of else ""
        (images / sub).mkdir(parents=True, exist_ok=True)
        (labels / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BCCD / "JPEGImages" / f"{i}.jpg", images / sub / f"{i}.jpg")
        if k not in unlabelled:
            rows = ["0 320 240 50 40"] if k in pixels else _yolo_rows(i, ["RBC", "WBC", "Platelets"])
            (labels / sub / f"{i}.txt").write_text("\n".join(rows) + "\n")
    if names is not None:
        (labels / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def _load(src: Path, **kwargs) -> tuple[DetectionData, list[str]]:
    """detection_data and the warnings it gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = detection_data(src, **kwargs)
    return data, [str(w.message) for w in record]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mtime and size: the source folder must come out of conversion unchanged."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def _labels(data: DetectionData) -> dict[str, dict[str, list[list[float]]]]:
    """Split -> label file (under labels/<split>/) -> its rows, as converted."""
    base = data.yaml.parent / "labels"
    return {s: {f.relative_to(base / s).as_posix(): [[float(v) for v in ln.split()]
                                                     for ln in f.read_text().splitlines()]
                for f in sorted((base / s).rglob("*.txt"))} for s in data.images}


def _split_lists(data: DetectionData) -> dict[str, list[str]]:
    return {s: f.read_text().split() for s, f in data.split_files.items()}


def _check_consistent(data: DetectionData) -> dict[str, dict[str, list[list[float]]]]:
    """Counts agree with the converted files, and every class is in every split (each has three images or more)."""
    labels = _labels(data)
    assert list(data.images) == list(SPLITS)
    for s, files in labels.items():
        images = [p for p in (data.yaml.parent / "images" / s).rglob("*") if p.is_file()]
        assert data.images[s] == len(files) == len(images) > 0
        assert data.objects[s] == sum(len(rows) for rows in files.values())
        assert data.empty[s] == sum(not rows for rows in files.values())
        assert {int(row[0]) for rows in files.values() for row in rows} == set(range(len(data.names))), s
    return labels


def _xml_boxes(ids: list[str]) -> int:
    return sum(len(ET.parse(BCCD / "Annotations" / f"{i}.xml").getroot().findall("object")) for i in ids)


def test_labelimg_voc_folder_gets_a_seeded_stratified_split(tmp_path: Path) -> None:
    ids = _ids()
    src = _labelimg(tmp_path / "cells", ids)
    before = _snapshot(src)
    data, messages = _load(src, cache_dir=tmp_path / "cache")
    assert len(messages) == 2 and messages[0].startswith(
        "cells: no splits given: made a seeded 70/15/15 split by image (seed 0)")
    assert data.names == ["Eos", "Platelets", "RBC", "WBC"]
    _check_consistent(data)  # the rare class (three images) is in every split too
    assert sum(data.images.values()) == N and all(abs(data.images[s] - f * N) <= 2 for s, f in
                                                  zip(SPLITS, (0.7, 0.15, 0.15), strict=True))
    # every box is kept, or dropped by its own cause: swapped corners are inverted, not zero area
    assert sum(data.objects.values()) + data.count("inverted") + data.count("zero area") == _xml_boxes(ids)
    assert (data.count("inverted"), data.count("zero area"), data.count("no annotation")) == (1, 1, 1)
    lists = _split_lists(data)
    assert sorted(i for v in lists.values() for i in v) == ids  # each image in one split, the unlabelled in none
    for s, listed in lists.items():
        assert sorted(p.stem for p in (data.yaml.parent / "images" / s).iterdir()) == listed
    inverted = next(s for s in SPLITS if ids[5] in lists[s])
    zero = next(s for s in SPLITS if ids[7] in lists[s])
    lines = {line.split(":")[0].split(";")[0]: line for line in data.summary().splitlines()}
    assert f"1 inverted corners ({ids[5]}.xml)" in lines[inverted] and "boxes dropped: " in lines[inverted]
    assert f"1 zero area ({ids[7]}.xml)" in lines[zero]
    assert lines["before splitting"] == "before splitting; images left out: 1 no annotation file (unlabelled.jpg)"
    assert messages[1].startswith("cells: 1 boxes dropped with zero area") and data.summary().splitlines()[0] in \
        messages[1]

    with pytest.warns(UserWarning) as record:
        again = voc_to_yolo(src, cache_dir=tmp_path / "other-cache")  # the same seed: the same split
    assert _split_lists(again) == lists and "no splits given" in str(record[0].message)
    assert [str(w.message) for w in record][1:] == messages[1:]
    reseeded, messages = _load(src, cache_dir=tmp_path / "cache", split_seed=1)
    assert "split by image (seed 1)" in messages[0]
    assert reseeded.yaml != data.yaml and _split_lists(reseeded) != lists
    _check_consistent(reseeded)
    other, messages = _load(src, cache_dir=tmp_path / "cache", split=(0.6, 0.2, 0.2))
    assert "made a seeded 60/20/20 split" in messages[0] and other.images == {"train": 18, "val": 6, "test": 6}
    assert _snapshot(src) == before  # nothing was written into the user's folder


def test_yolo_folder_with_classes_txt_and_no_split_subfolders(tmp_path: Path) -> None:
    ids = _ids()
    names = ["RBC", "WBC", "Platelets"]
    src = _yolo(tmp_path / "yolo", ids, names, pixels=(4,), unlabelled=(9,))
    before = _snapshot(src)
    data, messages = _load(src, cache_dir=tmp_path / "cache")
    assert messages[0].startswith("yolo: no splits given: made a seeded 70/15/15 split by image (seed 0)")
    assert f"1 images dropped for a bad label file (e.g. {ids[4]}.txt: coordinates above 1" in messages[1]
    assert data.names == names  # classes.txt's order is the class ids'
    labels = _check_consistent(data)
    assert sum(data.images.values()) == N - 1 and data.empty_images == 1  # the unlabelled image is a negative
    assert sum(data.objects.values()) == _xml_boxes(ids) - _xml_boxes([ids[4], ids[9]])
    lists = _split_lists(data)
    assert sorted(k for v in lists.values() for k in v) == sorted(f"{i}.jpg" for k, i in enumerate(ids) if k != 4)
    split = next(s for s in SPLITS if f"{ids[0]}.jpg" in lists[s])  # a box converted there and back is unchanged
    source = [[float(v) for v in row.split()] for row in _yolo_rows(ids[0], names)]
    assert labels[split][f"{ids[0]}.txt"] == [pytest.approx(row, abs=2e-6) for row in source]
    assert _split_lists(_load(src, cache_dir=tmp_path / "again")[0]) == lists
    assert _split_lists(_load(src, cache_dir=tmp_path / "cache", split_seed=7)[0]) != lists
    assert _snapshot(src) == before


def test_yolo_folder_with_split_subfolders_keeps_its_split(tmp_path: Path) -> None:
    ids = _ids()
    src = _yolo(tmp_path / "yolo", ids, None, split_of=lambda k: "train" if k < 20 else "val" if k < 25 else "test",
                folders=("Images", "Labels"))  # folder names in any case
    before = _snapshot(src)
    with pytest.raises(PrunekitError, match=r"without class names: add .*classes\.txt.* or give names="):
        detection_data(src, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean data with its own split: nothing to warn about
        data = detection_data(src, names=["RBC", "WBC", "Platelets"], cache_dir=tmp_path / "cache")
    assert data.images == {"train": 20, "val": 5, "test": 5} and data.split_files == {}
    labels = _check_consistent(data)
    assert set(labels["val"]) == {f"{i}.txt" for i in ids[20:25]}
    assert sum(data.objects.values()) == _xml_boxes(ids) and not data.problems()
    assert data.summary().splitlines()[2] == f"test: 5 images (0 without boxes), {data.objects['test']} boxes"
    assert _snapshot(src) == before
    (src / "data.yaml").write_text("train: Images/train\nnames: {0: RBC, 1: WBC, 2: Platelets}\n")
    shutil.copyfile(BCCD / "JPEGImages" / f"{ids[0]}.jpg", src / "Images" / "loose.jpg")
    with pytest.warns(UserWarning, match=r"1 images outside the split folders left out \(e\.g\. loose\.jpg\)"):
        named = detection_data(src, cache_dir=tmp_path / "cache")
    assert named.names == ["RBC", "WBC", "Platelets"] and named.images == data.images  # names from data.yaml


def _voc_without(tmp: Path, what: str) -> Path:
    src = _labelimg(tmp / "src", _ids(4))
    for f in (src / what).iterdir():
        f.unlink()
    return src


BAD = [  # (name, make the source folder, detection_data keywords, what the error says)
    ("voc-no-images", lambda t: _voc_without(t, "images"), {}, ["images has no images"]),
    ("voc-no-annotations", lambda t: _voc_without(t, "annotations"), {}, ["annotations has no annotations"]),
    ("yolo-no-annotations", lambda t: _yolo(t / "src", _ids(4), ["RBC"], unlabelled=(0, 1, 2, 3)), {},
     ["labels has no annotations"]),
    ("voc-all-boxes-dropped", lambda t: _labelimg(t / "src", _ids(4)), {"names": ["fish"]},
     ["all boxes were dropped (", "objects of classes the model does not have dropped"]),
    ("yolo-all-in-pixels", lambda t: _yolo(t / "src", _ids(4), ["RBC", "WBC", "Platelets"], pixels=(0, 1, 2, 3)),
     {}, ["all boxes were dropped (4 images dropped for a bad label file", "not pixels"]),
    ("yolo-empty-split-folder", lambda t: _yolo(t / "src", _ids(4), ["RBC", "WBC", "Platelets"],
                                                split_of=lambda k: "train" if k < 2 else "val"), {},
     ["split 'test' (", "test) has no images"]),  # its test folder is made below, empty
    ("voc-too-few-to-split", lambda t: _labelimg(t / "src", _ids(2)), {}, ["too few to split into train, val, test"]),
    ("neither-layout", lambda t: (t / "src" / "pics").mkdir(parents=True) or t / "src", {},
     ["nor a YOLO txt folder"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_error_naming_the_folder_and_writes_nothing_there(case, tmp_path: Path) -> None:
    name, make, kwargs, expected = case
    src = make(tmp_path).resolve()
    if name == "yolo-empty-split-folder":
        (src / "images" / "test").mkdir()
    before = _snapshot(src)
    with pytest.raises(PrunekitError) as exc:
        detection_data(src, cache_dir=tmp_path / "cache", **kwargs)
    message = str(exc.value)
    assert str(src) in message and "\n" not in message and all(e in message for e in expected), message
    assert _snapshot(src) == before


@pytest.mark.parametrize("kwargs", [{"split": (0.5, 0.2, 0.2)}, {"split": (0, 0.5, 0.5)}, {"split": (0.8, 0.2)},
                                    {"split_seed": "0"}, {"names": ["a", "a"]}])
def test_bad_options_are_refused(kwargs, tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="split must be three fractions|split_seed must be|distinct"):
        detection_data(_labelimg(tmp_path / "src", _ids(4)), cache_dir=tmp_path / "cache", **kwargs)


def _txt_folder(root: Path, images: list[str], classes: str | None, yaml_names: dict | None) -> Path:
    import yaml

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in images:
        Image.new("RGB", (64, 48), (90, 30, 10)).save(root / "images" / name)
        (root / "labels" / f"{Path(name).stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    if yaml_names is not None:
        (root / "data.yaml").write_text(yaml.safe_dump({"names": yaml_names}))
    return root


@pytest.mark.parametrize("images, classes, yaml_names, message", [
    (["a.jpg", "b.jpg"], "cell\n", {0: "rbc"}, "name different classes"),
    (["a.jpg", "a.png"], "cell\n", None, "share one label file"),
])
def test_a_yolo_folder_that_contradicts_itself_is_one_error(tmp_path, images, classes, yaml_names, message):
    root = _txt_folder(tmp_path / "d", images, classes, yaml_names)
    with pytest.raises(PrunekitError, match=message):
        detection_data(root, cache_dir=tmp_path / "cache")
