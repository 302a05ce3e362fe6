"""Detection data in the YOLO layout as Ultralytics reads it: the ``DetectionData`` record (classes, and what
conversion and checking changed, per split), a split's image files and label files, and the label checks that
count what Ultralytics would refuse (an image with a bad label line is dropped whole)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PrunekitError
from ..files import read_yaml

SPLITS = ("train", "val", "test")
_FORMAT = 3  # bump when the conversion changes, so old caches are not reused
EXAMPLES = 3  # file names shown per kind of problem
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
KINDS = {  # kind of problem -> (what happened, its short name in a split's line, its name in the one-line total)
    "clipped": ("boxes changed", "clipped", "boxes clipped to the image"),
    "zero area": ("boxes dropped", "zero area", "boxes dropped with zero area"),
    "inverted": ("boxes dropped", "inverted corners",
                 "boxes dropped with inverted corners (xmax < xmin or ymax < ymin)"),
    "difficult": ("boxes dropped", "difficult", "difficult objects left out"),
    "unknown class": ("boxes dropped", "unknown class", "objects of classes the model does not have dropped"),
    "bad label": ("images left out", "bad label file", "images dropped for a bad label file"),
    "no annotation": ("images left out", "no annotation file", "images without an annotation file left out"),
    "no split": ("images left out", "outside the split folders", "images outside the split folders left out"),
}


@dataclass
class DetectionData:
    """A YOLO-layout data set: the data yaml Ultralytics reads, its classes and what conversion did, per split."""

    yaml: Path
    names: list[str]
    images: dict[str, int] = field(default_factory=dict)  # split -> images kept
    objects: dict[str, int] = field(default_factory=dict)  # split -> boxes kept
    empty: dict[str, int] = field(default_factory=dict)  # split -> kept images without a box (negatives)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split ('' before splitting) -> kind -> n
    examples: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # split -> kind -> first files
    split_files: dict[str, Path] = field(default_factory=dict)  # the split prunekit made: split -> its image list

    def note(self, split: str, kind: str, file: str) -> None:
        """Count one box or image changed or left out in ``split``, keeping the first few files as examples."""
        counts = self.counts.setdefault(split, {})
        counts[kind] = counts.get(kind, 0) + 1
        files = self.examples.setdefault(split, {}).setdefault(kind, [])
        if len(files) < EXAMPLES and file not in files:
            files.append(file)

    def count(self, kind: str, split: str | None = None) -> int:
        """How many boxes or images of one kind of problem, in one split or in all."""
        return sum(c.get(kind, 0) for s, c in self.counts.items() if split in (None, s))

    empty_images = property(lambda self: sum(self.empty.values()))
    clipped = property(lambda self: self.count("clipped"))
    dropped_empty = property(lambda self: self.count("zero area"))
    inverted = property(lambda self: self.count("inverted"))
    difficult = property(lambda self: self.count("difficult"))
    unknown_class = property(lambda self: self.count("unknown class"))
    dropped_images = property(lambda self: self.count("bad label"))

    def problems(self) -> str:
        """One line naming every kind of box or image changed or left out, with the first files, or ''."""
        parts = []
        for kind, (*_, what) in KINDS.items():
            if n := self.count(kind):
                files = list(dict.fromkeys(f for ex in self.examples.values() for f in ex.get(kind, [])))[:EXAMPLES]
                parts.append(f"{n} {what}" + (f" (e.g. {', '.join(files)})" if files else ""))
        return ", ".join(parts)

    def summary(self) -> str:
        """One line per split (and one for images left out before splitting): images, boxes, and each kind of box
        changed or dropped and image left out, by cause with the first files, so a user sees what training gets."""
        lines = []
        for split in [*self.images, *([""] if self.counts.get("") else [])]:
            head = (f"{split}: {self.images[split]} images ({self.empty.get(split, 0)} without boxes), "
                    f"{self.objects.get(split, 0)} boxes" if split else "before splitting")
            groups: dict[str, list[str]] = {}
            for kind, (group, short, _) in KINDS.items():
                if n := self.count(kind, split):
                    files = self.examples.get(split, {}).get(kind, [])
                    groups.setdefault(group, []).append(f"{n} {short}" + (f" ({', '.join(files)})" if files else ""))
            lines.append("; ".join([head, *(f"{g}: {', '.join(v)}" for g, v in groups.items())]))
        return "\n".join(lines)


def _yaml_names(cfg: dict, path: Path) -> list[str]:
    found = cfg.get("names")
    names = list(found.values()) if isinstance(found, dict) else found
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PrunekitError(f"{path}: names must be a list (or id: name mapping) of class names")
    return names


def _warn_problems(name: str, data: DetectionData) -> None:
    if data.problems():
        summary = "".join(f"\n  {line}" for line in data.summary().splitlines())
        warnings.warn(f"{name}: {data.problems()}{summary}", stacklevel=4)


def label_file(image: Path) -> Path:
    """The label file Ultralytics reads for an image: the last ``images`` folder of its path becomes ``labels``."""
    parts = list(image.parts)
    i = max((k for k, p in enumerate(parts) if p == "images"), default=None)
    if i is None:
        return image.with_suffix(".txt")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def _parse_label(line: str) -> tuple[int, list[float]] | str:
    """A label line's class id and box (x y w h), or why Ultralytics would refuse it (and the whole image)."""
    fields = line.split()
    if len(fields) != 5:
        return f"{len(fields)} fields, a box needs 5 (class x y w h)"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return "a non-numeric value"
    if not all(math.isfinite(v) for v in values):
        return "a value that is not a finite number (nan or inf)"
    if not values[0].is_integer() or values[0] < 0:
        return f"class id {fields[0]} is not a class index"
    if any(v < 0 for v in values[1:]):
        return "a negative coordinate"
    if any(v > 1 for v in values[1:]):
        return "coordinates above 1 (YOLO labels are fractions of the image size, not pixels)"
    return int(values[0]), values[1:]


def _label_problem(line: str, classes: int) -> str | None:
    """Why Ultralytics would refuse this label line (and with it the whole image), or None."""
    parsed = _parse_label(line)
    if isinstance(parsed, str):
        return parsed
    return f"class id {parsed[0]} is not in 0..{classes - 1}" if parsed[0] >= classes else None


def _label_lines(lf: Path) -> list[str]:
    try:
        return [ln for ln in lf.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        return ["?"]  # refused as a line of one field


def check_labels(data: DetectionData, split: str) -> None:
    """Count a split's images and objects as Ultralytics will train or score them: an image with any bad label
    line is dropped whole (counted, its file named); a split left with no object is an error."""
    images = split_images(data, split)
    objects = dropped = empty = 0
    for image in images:
        lf = label_file(image)
        lines = _label_lines(lf) if lf.is_file() else []  # an image without a label file is a negative
        why = next((w for ln in lines if (w := _label_problem(ln, len(data.names))) is not None), None)
        if why is not None:
            dropped += 1
            data.note(split, "bad label", f"{lf.name}: {why}")
            continue
        objects += len(lines)
        empty += not lines
    data.images[split], data.objects[split], data.empty[split] = len(images) - dropped, objects, empty
    if not objects:
        why = f"; {dropped} of {len(images)} images have a bad label file ({data.examples[split]['bad label'][0]})" \
            if dropped else ""
        raise PrunekitError(f"{data.yaml}: split {split!r} has no object to train or score on{why}")


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
