"""Pascal VOC detection directories as the YOLO txt layout Ultralytics trains on.

``voc_to_yolo(root)`` converts ``Annotations/*.xml`` + ``JPEGImages`` + ``ImageSets/Main/<split>.txt``
once into ``<cache>/yolo-data/<name>-<key>/`` (``images/<split>``, ``labels/<split>``, ``data.yaml``),
keyed by the directory's path and the contents of its annotations and split lists, so an
edited annotation converts again. Boxes are shifted from VOC's 1-based pixels as Ultralytics' own VOC
conversion does (width = xmax - xmin) and checked against the image's real size: boxes reaching
outside are clipped, boxes with no area left (BCCD has points with xmin = xmax) are dropped,
objects marked ``difficult`` are left out (VOC excludes them from training and scoring); each kind
is counted and reported in one warning. Images without objects keep an empty label
file: they are negatives the detector must learn. Class names are the sorted names found in the
annotations unless given. A ``.yaml`` path is taken as an existing YOLO data set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ..data._folder import default_cache_dir
from ..errors import PrunekitError
from ..io import read_yaml

SPLITS = ("train", "val", "test")
_FORMAT = 2  # bump when the conversion changes, so old caches are not reused
EXAMPLES = 3  # file names shown per kind of problem


@dataclass
class DetectionData:
    """A YOLO-layout data set: the data yaml Ultralytics reads, its classes and what conversion did."""

    yaml: Path
    names: list[str]
    images: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    empty_images: int = 0
    clipped: int = 0
    dropped_empty: int = 0
    difficult: int = 0
    unknown_class: int = 0
    inverted: int = 0
    dropped_images: int = 0  # images whose label file Ultralytics would refuse (YOLO layout)
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind of problem -> first few files

    def problems(self) -> str:
        """One line naming every kind of box that was changed or left out, with the first files, or ''."""
        kinds = (("clipped", self.clipped, "boxes clipped to the image"),
                 ("zero area", self.dropped_empty, "boxes dropped with zero area"),
                 ("inverted", self.inverted, "boxes dropped with inverted corners (xmax < xmin or ymax < ymin)"),
                 ("difficult", self.difficult, "difficult objects left out"),
                 ("unknown class", self.unknown_class, "objects of classes the model does not have dropped"),
                 ("bad label", self.dropped_images, "images dropped for a bad label file"))
        parts = []
        for key, n, what in kinds:
            if n:
                files = self.examples.get(key, [])
                parts.append(f"{n} {what}" + (f" (e.g. {', '.join(files)})" if files else ""))
        return ", ".join(parts)


def detection_data(path: str | Path, *, names: list[str] | None = None, cache_dir: str | Path | None = None,
                   keep_difficult: bool = False) -> DetectionData:
    """A YOLO data yaml as is, or a Pascal VOC directory converted by ``voc_to_yolo``."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        cfg = read_yaml(path, "YOLO data yaml")
        if not isinstance(cfg, dict) or "names" not in cfg or "train" not in cfg:
            raise PrunekitError(f"{path} is not a YOLO data yaml (it needs train: and names:)")
        found = cfg["names"]
        names = list(found.values()) if isinstance(found, dict) else found
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise PrunekitError(f"{path}: names must be a list (or id: name mapping) of class names")
        data = DetectionData(path, names)
        for split in (s for s in SPLITS if cfg.get(s)):
            check_labels(data, split)
        if data.problems():
            warnings.warn(f"{path.name}: {data.problems()}", stacklevel=2)
        return data
    return voc_to_yolo(path, names=names, cache_dir=cache_dir, keep_difficult=keep_difficult)


def label_file(image: Path) -> Path:
    """The label file Ultralytics reads for an image: the last ``images`` folder of its path becomes ``labels``."""
    parts = list(image.parts)
    i = max((k for k, p in enumerate(parts) if p == "images"), default=None)
    if i is None:
        return image.with_suffix(".txt")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def _label_problem(line: str, classes: int) -> str | None:
    """Why Ultralytics would refuse this label line (and with it the whole image), or None."""
    fields = line.split()
    if len(fields) != 5:
        return f"{len(fields)} fields, a box needs 5 (class x y w h)"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return "a non-numeric value"
    if not values[0].is_integer() or not 0 <= values[0] < classes:
        return f"class id {fields[0]} is not in 0..{classes - 1}"
    if any(v < 0 for v in values[1:]):
        return "a negative coordinate"
    if any(v > 1 for v in values[1:]):
        return "coordinates above 1 (YOLO labels are fractions of the image size, not pixels)"
    return None


def check_labels(data: DetectionData, split: str) -> None:
    """Count a split's images and objects as Ultralytics will train or score them: an image with any bad label
    line is dropped whole (counted, its file named); a split left with no object is an error."""
    images = split_images(data, split)
    objects = dropped = 0
    for image in images:
        lf = label_file(image)
        if not lf.is_file():
            continue  # an image without a label file is a negative
        try:
            lines = [ln for ln in lf.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError):
            lines = ["?"]
        why = next((w for ln in lines if (w := _label_problem(ln, len(data.names))) is not None), None)
        if why is not None:
            dropped += 1
            data.examples.setdefault("bad label", [])
            if len(data.examples["bad label"]) < EXAMPLES:
                data.examples["bad label"].append(f"{lf.name}: {why}")
            continue
        objects += len(lines)
    data.dropped_images += dropped
    data.images[split], data.objects[split] = len(images) - dropped, objects
    if not objects:
        why = f"; {dropped} of {len(images)} images have a bad label file ({data.examples['bad label'][0]})" \
            if dropped else ""
        raise PrunekitError(f"{data.yaml}: split {split!r} has no object to train or score on{why}")


def voc_to_yolo(root: str | Path, *, names: list[str] | None = None, cache_dir: str | Path | None = None,
                keep_difficult: bool = False) -> DetectionData:
    """Convert (or find already converted) the VOC directory ``root``; warns once per call about changed boxes."""
    root = Path(root).expanduser().resolve()
    ann_dir, img_dir, sets = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise PrunekitError(f"{root} is not a Pascal VOC directory: it needs Annotations/ and JPEGImages/")
    splits = {s: sets / f"{s}.txt" for s in SPLITS if (sets / f"{s}.txt").is_file()}
    if "train" not in splits:
        raise PrunekitError(f"{root} has no ImageSets/Main/train.txt: list the training image ids there "
                            "(and val.txt, test.txt)")
    if names is not None and (not names or len(set(names)) != len(names)):
        raise PrunekitError(f"names must be distinct class names, got {names}")
    stamp = [_FORMAT, str(root), names, keep_difficult]
    for f in [*sorted(ann_dir.glob("*.xml")), *splits.values()]:  # by content: an edit keeping mtimes counts too
        stamp.append([f.name, hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()])
    key = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = out / "yolo-data" / f"{root.name}-{key}"
    if not (out / "stats.json").is_file():
        _convert(root, splits, out, names, keep_difficult)
    stats = json.loads((out / "stats.json").read_text())
    data = DetectionData(out / "data.yaml", **stats)
    empty = [s for s in data.images if not data.objects.get(s)]
    if empty:
        raise PrunekitError(f"{root}: split {empty[0]!r} has no object left to train or score on"
                            + (f" ({data.problems()})" if data.problems() else ""))
    if data.problems():
        warnings.warn(f"{root.name}: {data.problems()}", stacklevel=2)
    return data


def _ids(split_file: Path) -> list[str]:
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def _objects(xml_file: Path) -> list[tuple[str, bool, list[float]]]:
    """(class name, difficult, [xmin, ymin, xmax, ymax]) of every object, as written in the XML."""
    try:
        tree = ET.parse(xml_file)
    except ET.ParseError as exc:
        raise PrunekitError(f"{xml_file} is not valid XML ({exc})") from exc
    objs = []
    for obj in tree.getroot().iter("object"):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if not name or box is None:
            raise PrunekitError(f"{xml_file}: an <object> without <name> or <bndbox>")
        try:
            coords = [float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise PrunekitError(f"{xml_file}: object {name!r} has a non-numeric box coordinate") from exc
        objs.append((name.strip(), (obj.findtext("difficult") or "0").strip() == "1", coords))
    return objs


def _image_for(img_dir: Path, image_id: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp"):
        if (img_dir / f"{image_id}{ext}").is_file():
            return img_dir / f"{image_id}{ext}"
    raise PrunekitError(f"image {image_id!r} is listed in ImageSets but not in {img_dir}")


def _convert(root: Path, splits: dict[str, Path], out: Path, names: list[str] | None, keep_difficult: bool) -> None:
    """Write the YOLO layout to a temporary folder beside ``out`` and rename it into place when complete."""
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    listed = {s: _ids(f) for s, f in splits.items()}
    for split, ids in listed.items():
        missing = [i for i in ids if not (ann_dir / f"{i}.xml").is_file()]
        if missing:
            raise PrunekitError(f"{splits[split]} lists {len(missing)} image(s) without an annotation in {ann_dir} "
                                f"(e.g. {', '.join(missing[:EXAMPLES])}); add their XML or remove them from the list")
    parsed = {i: _objects(ann_dir / f"{i}.xml") for ids in listed.values() for i in ids}
    # the model's classes are those it can learn: the training split's (a class only in test is not one)
    classes = list(names) if names is not None else sorted({o[0] for i in listed["train"] for o in parsed[i]})
    if not classes:
        raise PrunekitError(f"{root}: no objects in the training split's annotations and no names given")
    index = {n: i for i, n in enumerate(classes)}
    stats = {"names": classes, "images": {}, "objects": {}, "empty_images": 0, "clipped": 0, "dropped_empty": 0,
             "difficult": 0, "unknown_class": 0, "inverted": 0, "examples": {}}

    def note(kind: str, image_id: str) -> None:
        files = stats["examples"].setdefault(kind, [])
        if len(files) < EXAMPLES and f"{image_id}.xml" not in files:
            files.append(f"{image_id}.xml")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, ids in listed.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            n_obj = 0
            for image_id in ids:
                src = _image_for(img_dir, image_id)
                try:
                    with Image.open(src) as im:
                        w, h = im.size
                        im.verify()
                except Exception as exc:  # PIL's own errors, or Ultralytics' HEIF hook for an unknown format
                    raise PrunekitError(f"{src} is not a readable image ({type(exc).__name__}); replace it or "
                                        f"remove {image_id} from {splits[split].name}") from exc
                lines = []
                for name, difficult, (x0, y0, x1, y1) in parsed[image_id]:
                    if difficult and not keep_difficult:
                        stats["difficult"] += 1
                        note("difficult", image_id)
                        continue
                    if name not in index:
                        stats["unknown_class"] += 1
                        note("unknown class", image_id)
                        continue
                    if x1 < x0 or y1 < y0:
                        stats["inverted"] += 1
                        note("inverted", image_id)
                        continue
                    x0, y0, x1, y1 = x0 - 1, y0 - 1, x1 - 1, y1 - 1  # VOC pixels are 1-based
                    cx0, cy0, cx1, cy1 = min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)
                    if cx1 <= cx0 or cy1 <= cy0:
                        stats["dropped_empty"] += 1
                        note("zero area", image_id)
                        continue
                    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                        stats["clipped"] += 1
                        note("clipped", image_id)
                    lines.append(f"{index[name]} {(cx0 + cx1) / 2 / w:.6f} {(cy0 + cy1) / 2 / h:.6f} "
                                 f"{(cx1 - cx0) / w:.6f} {(cy1 - cy0) / h:.6f}")
                stats["empty_images"] += not lines
                n_obj += len(lines)
                _link(src, tmp / "images" / split / src.name)
                (tmp / "labels" / split / f"{src.stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
            stats["images"][split], stats["objects"][split] = len(ids), n_obj
        cfg = {"path": str(out), **{s: f"images/{s}" for s in listed}, "names": dict(enumerate(classes))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (tmp / "stats.json").write_text(json.dumps(stats))
        if out.exists() and not (out / "stats.json").is_file():  # left incomplete by a crash
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "stats.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link(src: Path, dst: Path) -> None:
    """Hard link when possible (no second copy on disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)



IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def split_images(data: DetectionData, split: str) -> list[Path]:
    """The image files of a split as the data yaml names them: a folder, a ``.txt`` list, a file, or a list of them."""
    cfg = read_yaml(data.yaml, "YOLO data yaml")
    root = Path(cfg.get("path") or data.yaml.parent)
    root = root if root.is_absolute() else data.yaml.parent / root
    entries = cfg.get(split)
    if not entries:
        raise PrunekitError(f"{data.yaml} has no {split!r} split")
    files: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        p = Path(entry) if Path(entry).is_absolute() else root / entry
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file() and p.suffix == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            files += [Path(ln) if Path(ln).is_absolute() else p.parent / ln for ln in lines]
        elif p.is_file():
            files.append(p)
        else:
            raise PrunekitError(f"{data.yaml}: split {split!r} points to {p}, which does not exist")
    return sorted(files)


def letterbox(path: str | Path, imgsz: int) -> torch.Tensor:
    """One image as the detector sees it at validation: RGB in [0, 1], longest side ``imgsz``, padded to a
    square with grey 114 (Ultralytics' letterbox), shape (3, imgsz, imgsz)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = imgsz / max(im.size)
        w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        canvas = Image.new("RGB", (imgsz, imgsz), (114, 114, 114))
        canvas.paste(im.resize((w, h), Image.BILINEAR), ((imgsz - w) // 2, (imgsz - h) // 2))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float().div_(255)


def image_batches(data: DetectionData, split: str = "train", *, imgsz: int, batch: int = 16,
                  limit: int | None = None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Letterboxed images of a split in a seeded order, as ``(images, image indices)`` batches.

    Pruning methods take these as example inputs and calibration data (the method contract's
    ``(inputs, targets)`` batches; the targets are unused, so they are the images' indices).
    """
    files = split_images(data, split)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()[:limit]
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        out.append((torch.stack([letterbox(files[i], imgsz) for i in idx]), torch.tensor(idx)))
    return out
