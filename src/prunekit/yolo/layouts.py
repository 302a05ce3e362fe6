"""Detection folders as users have them (Pascal VOC, LabelImg, YOLO txt; see ``prunekit.yolo.data``) found on
disk and converted once into the YOLO layout in the cache: boxes checked against each image's real size, a seeded
stratified split made where the folder gives none."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from ..data._folder import default_cache_dir
from ..errors import PrunekitError
from ..files import read_yaml
from .labels import (
    _FORMAT,
    EXAMPLES,
    IMAGE_SUFFIXES,
    SPLITS,
    DetectionData,
    _label_lines,
    _parse_label,
    _warn_problems,
    _yaml_names,
)


@dataclass
class _Folder:
    """A detection folder as found on disk, before any annotation is read."""

    root: Path
    kind: str  # "voc" or "yolo"
    images: dict[str, Path]  # key (a VOC id, or a YOLO image's path under images/) -> image file
    dest: dict[str, str]  # key -> the image's path under images/<split>/ in the converted folder
    labels: dict[str, Path]  # key -> its annotation file (a YOLO image without one is a negative)
    splits: dict[str, list[str]]  # the splits the folder gives: split -> keys; {} when it gives none
    where: dict[str, Path]  # split -> the list file or folder that gives it, for messages
    names: list[str] | None  # the class names given or found (YOLO); None: VOC's training split decides
    stamped: list[Path]  # split lists and class-name files: part of the cache key with the labels
    left_out: dict[str, list[str]] = field(default_factory=dict)  # kind -> images left out before splitting


def _subdir(parent: Path | None, *names: str) -> Path | None:
    """The child folder called any of ``names``, ignoring case (VOC writes Annotations, LabelImg annotations)."""
    if parent is None or not parent.is_dir():
        return None
    found = {p.name.lower(): p for p in sorted(parent.iterdir()) if p.is_dir()}
    return next((found[n] for n in names if n in found), None)


def _files(folder: Path, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """The files with one of ``suffixes`` (any case), hidden ones (macOS ``._`` forks) left out, sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file())


def _check_names(names: list[str] | None, where: str) -> None:
    if names is not None and (not isinstance(names, list | tuple) or not names or len(set(names)) != len(names)
                              or not all(isinstance(n, str) and n.strip() for n in names)):
        raise PrunekitError(f"{where}: class names must be distinct non-empty names, got {names}")


def _scan(root: Path, names: list[str] | None, voc_only: bool) -> _Folder:
    if not root.is_dir():
        raise PrunekitError(f"data not found: {root} (give a Pascal VOC or YOLO txt folder, or a YOLO data yaml)")
    ann, img, labels = _subdir(root, "annotations"), _subdir(root, "jpegimages", "images"), _subdir(root, "labels")
    if ann and img and (voc_only or labels is None or _files(ann, (".xml",))):
        return _scan_voc(root, ann, img, names)
    layouts = "Annotations/ and JPEGImages/ (or LabelImg's annotations/ and images/)"
    if voc_only:
        raise PrunekitError(f"{root} is not a Pascal VOC directory: it needs {layouts}")
    if img and labels:
        return _scan_yolo(root, img, labels, names)
    raise PrunekitError(f"{root} is not a Pascal VOC directory ({layouts}) nor a YOLO txt folder (images/ and "
                        "labels/); or give a YOLO data yaml")


def _scan_voc(root: Path, ann: Path, img: Path, names: list[str] | None) -> _Folder:
    xmls = {p.stem: p for p in _files(ann, (".xml",))}
    if not xmls:
        raise PrunekitError(f"{ann} has no annotations (*.xml)")
    pics: dict[str, Path] = {}
    for p in _files(img, IMAGE_SUFFIXES):
        pics.setdefault(p.stem, p)
    if not pics:
        raise PrunekitError(f"{img} has no images ({', '.join(IMAGE_SUFFIXES)})")
    main = _subdir(_subdir(root, "imagesets"), "main")
    where = {s: main / f"{s}.txt" for s in SPLITS if main and (main / f"{s}.txt").is_file()}
    if where and "train" not in where:
        raise PrunekitError(f"{root} has no ImageSets/Main/train.txt: list the training image ids there "
                            "(and val.txt, test.txt), or remove ImageSets to have a seeded split made")
    splits = {s: [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip()] for s, f in where.items()}
    for split, ids in splits.items():
        for missing, what in (([i for i in ids if i not in xmls], f"without an annotation in {ann}"),
                              ([i for i in ids if i not in pics], f"without an image in {img}")):
            if missing:
                raise PrunekitError(f"{where[split]} lists {len(missing)} image(s) {what} (e.g. "
                                    f"{', '.join(missing[:EXAMPLES])}); add them or remove them from the list")
    orphans = sorted(xmls.keys() - pics.keys())
    if not splits and orphans:
        raise PrunekitError(f"{ann} has {len(orphans)} annotation(s) without an image in {img} (e.g. "
                            f"{', '.join(f'{i}.xml' for i in orphans[:EXAMPLES])})")
    keys = sorted({i for ids in splits.values() for i in ids}) if splits else sorted(xmls)
    unannotated = [] if splits else [pics[i].name for i in sorted(pics.keys() - xmls.keys())]
    return _Folder(root, "voc", {k: pics[k] for k in keys}, {k: pics[k].name for k in keys},
                   {k: xmls[k] for k in keys}, splits, where, names, list(where.values()),
                   {"no annotation": unannotated} if unannotated else {})


def _scan_yolo(root: Path, img: Path, labels: Path, names: list[str] | None) -> _Folder:
    pics = _files(img, IMAGE_SUFFIXES, recursive=True)
    if not pics:
        raise PrunekitError(f"{img} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if not [p for p in _files(labels, (".txt",), recursive=True) if p.name != "classes.txt"]:
        raise PrunekitError(f"{labels} has no annotations (YOLO label files, *.txt)")
    names, names_file = _yolo_names(root, labels, names)
    where = {s: d for s in SPLITS if (d := _subdir(img, s))}
    if where and "train" not in where:
        raise PrunekitError(f"{img} has {', '.join(d.name for d in where.values())}/ but no train/ folder")
    splits: dict[str, list[str]] = {s: [] for s in where}
    images, dest, lbl, outside = {}, {}, {}, []
    owner: dict[Path, str] = {}  # label file -> the image it belongs to
    for p in pics:
        rel = p.relative_to(img)
        split = next((s for s, d in where.items() if p.is_relative_to(d)), None)
        if where and split is None:
            outside.append(rel.as_posix())
            continue
        key = rel.as_posix()
        images[key], dest[key] = p, (p.relative_to(where[split]) if split else rel).as_posix()
        if (labels / rel).with_suffix(".txt").is_file():
            lbl[key] = (labels / rel).with_suffix(".txt")
            other = owner.setdefault(lbl[key], key)
            if other != key:  # Ultralytics would give both images the boxes of one of them
                raise PrunekitError(f"{images[other]} and {p} share one label file, {lbl[key]}: rename one of the "
                                    "images (and give it its own labels)")
        if split:
            splits[split].append(key)
    return _Folder(root, "yolo", images, dest, lbl, splits, where, names, [names_file] if names_file else [],
                   {"no split": outside} if outside else {})


def _yolo_names(root: Path, labels: Path, names: list[str] | None) -> tuple[list[str], Path | None]:
    """Class names in class id order: given, or a ``classes.txt`` (LabelImg writes one) or ``data.yaml``'s."""
    if names is not None:
        return names, None
    txt = next((f for f in (root / "classes.txt", labels / "classes.txt") if f.is_file()), None)
    yml = next((f for f in (root / "data.yaml", root / "data.yml") if f.is_file()), None)
    from_txt = from_yml = None
    if txt is not None:
        from_txt = [ln.strip() for ln in txt.read_text().splitlines() if ln.strip()]
        _check_names(from_txt, str(txt))
    if yml is not None:
        cfg = read_yaml(yml, "YOLO data yaml")
        from_yml = _yaml_names(cfg if isinstance(cfg, dict) else {}, yml)
    if from_txt is not None and from_yml is not None and from_txt != from_yml:
        raise PrunekitError(f"{txt} and {yml} name different classes ({', '.join(from_txt)[:120]} vs "
                            f"{', '.join(from_yml)[:120]}): make them agree, or give names=[...]")
    if from_txt is not None:
        return from_txt, txt
    if from_yml is not None:
        return from_yml, yml
    raise PrunekitError(f"{root} is a YOLO txt folder without class names: add {root / 'classes.txt'} (one name a "
                        "line, in class id order, as LabelImg writes it) or give names=[...]")


def _convert_folder(root: Path, names: list[str] | None, cache_dir: str | Path | None, keep_difficult: bool,
                    split_seed: int, split: tuple[float, float, float], *, voc_only: bool) -> DetectionData:
    """Scan, convert once into the cache (keyed by content), check the result and warn about what changed."""
    root = root.resolve()
    _check_names(names, "names")
    if (not isinstance(split, list | tuple) or len(split) != 3 or not all(isinstance(f, int | float) for f in split)
            or not all(0 <= f <= 1 for f in split) or split[0] <= 0 or abs(sum(split) - 1) > 1e-6):
        raise PrunekitError(f"split must be three fractions (train, val, test) adding up to 1, train above 0; "
                            f"got {split}")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise PrunekitError(f"split_seed must be an integer, got {split_seed!r}")
    folder = _scan(root, names, voc_only)
    stamp = [_FORMAT, str(root), folder.kind, folder.names, keep_difficult, split_seed, list(split),
             sorted(folder.images), folder.left_out]
    for f in sorted({*folder.labels.values(), *folder.stamped}):  # by content: an edit keeping mtimes counts too
        stamp.append([f.relative_to(root).as_posix(), hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest()])
    key = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = out / "yolo-data" / f"{root.name}-{key}"
    if not (out / "stats.json").is_file():
        _convert(folder, out, keep_difficult, split_seed, split)
    made = {s: out / "splits" / f"{s}.txt" for s in SPLITS if (out / "splits" / f"{s}.txt").is_file()}
    data = DetectionData(out / "data.yaml", **json.loads((out / "stats.json").read_text()), split_files=made)
    if not sum(data.objects.values()):
        raise PrunekitError(f"{root}: " + (f"all boxes were dropped ({data.problems()})" if data.problems()
                                           else "no boxes in any annotation"))
    for split_name, n in data.images.items():
        if not n:
            given = f" ({folder.where[split_name]})" if split_name in folder.where else ""
            raise PrunekitError(f"{root}: split {split_name!r}{given} has no images")
    empty = [s for s in data.images if not data.objects.get(s)]
    if empty:
        raise PrunekitError(f"{root}: split {empty[0]!r} has no object left to train or score on"
                            + (f" ({data.problems()})" if data.problems() else ""))
    if made:
        shares = "/".join(f"{f * 100:g}" for f in split if f)
        warnings.warn(f"{root.name}: no splits given: made a seeded {shares} split by image (seed {split_seed}), "
                      f"every class in every split where the images allow; the lists are in {out / 'splits'}. To "
                      "choose the split, give ImageSets/Main/{train,val,test}.txt (VOC) or images/{train,val,test}/ "
                      "(YOLO), or change split_seed", stacklevel=3)
    _warn_problems(root.name, data)
    return data


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


def _yolo_objects(label: Path, names: list[str]) -> list[tuple[str | None, bool, list[float]]] | str:
    """(class name, None for an id past the names; False; corners as fractions of the image) of every box,
    or why Ultralytics would refuse the file."""
    objs = []
    for line in _label_lines(label):
        parsed = _parse_label(line)
        if isinstance(parsed, str):
            return f"{label.name}: {parsed}"
        cls, (cx, cy, w, h) = parsed
        objs.append((names[cls] if cls < len(names) else None, False, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    return objs


def _make_split(classes: dict[str, set[str]], fractions: tuple[float, float, float], seed: int,
                root: Path) -> dict[str, list[str]]:
    """A seeded split by image, greedy by each image's rarest class: a split without that class gets the image
    (train first: the model's classes are the training split's), else the split furthest below its share of the
    class, among those not yet full, so every class reaches every split the images allow."""
    share = {s: f for s, f in zip(SPLITS, fractions, strict=True) if f}
    if not classes:
        return {s: [] for s in share}  # no usable image: the caller's checks say why
    keys = sorted(classes)
    random.Random(seed).shuffle(keys)  # the order among images alike
    freq = Counter(c for k in keys for c in classes[k])
    rarest = {k: min(classes[k], key=lambda c: (freq[c], c), default=None) for k in keys}
    keys.sort(key=lambda k: (rarest[k] is None, freq[rarest[k]]))
    size = {s: max(1, round(f * len(keys))) for s, f in share.items() if s != "train"}
    size = {"train": len(keys) - sum(size.values()), **size}
    if size["train"] < 1:
        raise PrunekitError(f"{root}: {len(keys)} usable images are too few to split into {', '.join(share)}; add "
                            "images or give the splits")
    out: dict[str, list[str]] = {s: [] for s in size}
    have = {s: Counter() for s in size}
    for k in keys:
        c = rarest[k]
        lacking = [s for s in size if c is not None and not have[s][c]]
        room = [s for s in size if len(out[s]) < size[s]] or list(size)
        score = {s: (share[s] * freq[c] - have[s][c] if c is not None else 0, (size[s] - len(out[s])) / size[s])
                 for s in room}
        s = lacking[0] if lacking else max(score, key=score.__getitem__)
        out[s].append(k)
        have[s].update(classes[k])
    return {s: sorted(v) for s, v in out.items()}


def _convert(folder: _Folder, out: Path, keep_difficult: bool, seed: int, fractions: tuple[float, float, float]
             ) -> None:
    """Read the annotations, split if the folder gives no split, and write the YOLO layout to a temporary folder
    beside ``out``, renamed into place when complete."""
    if folder.kind == "voc":
        parsed: dict[str, list | str] = {k: _objects(f) for k, f in folder.labels.items()}
    else:
        parsed = {k: _yolo_objects(folder.labels[k], folder.names) if k in folder.labels else [] for k in folder.images}
    data = DetectionData(out / "data.yaml", [])
    for kind, files in folder.left_out.items():
        for f in files:
            data.note("", kind, f)
    splits = folder.splits
    if not splits:
        usable = [k for k, objs in parsed.items() if not isinstance(objs, str)]
        for k in sorted(parsed.keys() - set(usable)):
            data.note("", "bad label", parsed[k])
        known = set(folder.names) if folder.names is not None else None
        splits = _make_split({k: {n for n, difficult, _ in parsed[k] if n is not None and (keep_difficult or not
                                  difficult) and (known is None or n in known)} for k in usable},
                             fractions, seed, folder.root)
    # the model's classes are those it can learn: the training split's (a class only in test is not one)
    classes = folder.names or sorted({o[0] for k in splits["train"] if isinstance(parsed[k], list) for o in parsed[k]})
    if not classes:
        raise PrunekitError(f"{folder.root}: no objects in the training split's annotations and no names given")
    data.names, index = list(classes), {n: i for i, n in enumerate(classes)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, keys in splits.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            data.images[split] = data.objects[split] = data.empty[split] = 0
            for key in keys:
                if isinstance(parsed[key], str):
                    data.note(split, "bad label", parsed[key])
                    continue
                lines = _box_lines(folder, key, parsed[key], index, keep_difficult, data, split)
                data.images[split] += 1
                data.objects[split] += len(lines)
                data.empty[split] += not lines
                dst = tmp / "images" / split / folder.dest[key]
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link(folder.images[key], dst)
                label = (tmp / "labels" / split / folder.dest[key]).with_suffix(".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(f"{ln}\n" for ln in lines))
            if not folder.splits:
                (tmp / "splits").mkdir(exist_ok=True)
                (tmp / "splits" / f"{split}.txt").write_text("".join(f"{k}\n" for k in keys))
        cfg = {"path": str(out), **{s: f"images/{s}" for s in splits}, "names": dict(enumerate(classes))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        stats = {k: v for k, v in vars(data).items() if k not in ("yaml", "split_files")}
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


def _box_lines(folder: _Folder, key: str, objs: list, index: dict[str, int], keep_difficult: bool,
               data: DetectionData, split: str) -> list[str]:
    """One image's YOLO label lines: boxes checked against its real size, each change or drop noted."""
    src, label = folder.images[key], folder.labels.get(key)
    try:
        with Image.open(src) as im:
            w, h = im.size
            im.verify()
    except Exception as exc:  # PIL's own errors, or Ultralytics' HEIF hook for an unknown format
        raise PrunekitError(f"{src} is not a readable image ({type(exc).__name__}); replace it or leave it out of "
                            "the data") from exc
    lines = []
    for name, difficult, (x0, y0, x1, y1) in objs:
        kind = ("difficult" if difficult and not keep_difficult else "unknown class" if name not in index
                else "inverted" if x1 < x0 or y1 < y0 else None)
        if kind is None:
            if folder.kind == "yolo":  # corners as fractions of the image
                x0, y0, x1, y1 = x0 * w, y0 * h, x1 * w, y1 * h
            else:  # VOC pixels are 1-based
                x0, y0, x1, y1 = x0 - 1, y0 - 1, x1 - 1, y1 - 1
            clipped = min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)
            cx0, cy0, cx1, cy1 = clipped
            if cx1 <= cx0 or cy1 <= cy0:
                kind = "zero area"
            elif max(abs(a - b) for a, b in zip(clipped, (x0, y0, x1, y1), strict=True)) > 0.01:  # not float noise
                data.note(split, "clipped", label.name)
        if kind is not None:
            data.note(split, kind, label.name)
            continue
        lines.append(f"{index[name]} {(cx0 + cx1) / 2 / w:.6f} {(cy0 + cy1) / 2 / h:.6f} "
                     f"{(cx1 - cx0) / w:.6f} {(cy1 - cy0) / h:.6f}")
    return lines


def _link(src: Path, dst: Path) -> None:
    """Hard link when possible (no second copy on disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
