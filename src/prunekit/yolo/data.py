"""Detection data as users have it, turned into the YOLO txt layout Ultralytics trains on.

``detection_data(path)`` takes a YOLO data yaml as it is, or converts a folder once into
``<cache>/yolo-data/<name>-<key>/`` (``images/<split>``, ``labels/<split>``, ``data.yaml``): a Pascal VOC folder
(``Annotations`` + ``JPEGImages``, or LabelImg's ``annotations`` + ``images``; names in any case) or a YOLO txt
folder (``images`` + ``labels``, class names from ``classes.txt``, a ``data.yaml`` beside them or ``names``).
Splits are VOC's ``ImageSets/Main/<split>.txt`` or YOLO's ``images/<split>`` folders; a folder without them gets a
seeded split by image, stratified so every class reaches every split the images allow, whose lists are kept in
the converted folder (``splits/<split>.txt``). The key is the folder's path, the contents of its annotations and
split lists, its image names and the options, so an edited annotation converts again; only the cache is written.

Boxes are checked against the image's real size (VOC's 1-based pixels shifted as Ultralytics' own VOC conversion
does, width = xmax - xmin): boxes reaching outside are clipped, boxes with no area left (BCCD has points with
xmin = xmax) or inverted corners are dropped, ``difficult`` objects are left out (VOC excludes them from training
and scoring), and so are objects of classes the model does not have; an image without an XML (VOC without
ImageSets) or whose YOLO label file Ultralytics would refuse is left out. Each kind is counted per split, with
the first files named, in one warning. Images without objects keep an empty label file: they are negatives the
detector must learn. VOC class names are the sorted names in the training split's annotations unless given.

The layouts are found and converted in ``prunekit.yolo.layouts``; the ``DetectionData`` record and the label checks
are in ``prunekit.yolo.labels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import PrunekitError
from ..files import read_yaml
from .labels import SPLITS, DetectionData, _warn_problems, _yaml_names, check_labels, label_file, split_images
from .layouts import _convert_folder

__all__ = ["SPLITS", "DetectionData", "check_labels", "detection_data", "image_batches", "label_file", "letterbox",
           "split_images", "voc_to_yolo"]


def detection_data(path: str | Path, *, names: list[str] | None = None, cache_dir: str | Path | None = None,
                   keep_difficult: bool = False, split_seed: int = 0,
                   split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> DetectionData:
    """A YOLO data yaml as is, or a VOC or YOLO txt folder converted into the cache (see the module docstring).

    ``split`` (train, val, test fractions) and ``split_seed`` make the split of a folder that gives none.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _from_yaml(path)
    return _convert_folder(path, names, cache_dir, keep_difficult, split_seed, split, voc_only=False)


def voc_to_yolo(root: str | Path, *, names: list[str] | None = None, cache_dir: str | Path | None = None,
                keep_difficult: bool = False, split_seed: int = 0,
                split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> DetectionData:
    """Convert (or find already converted) the Pascal VOC folder ``root``; a YOLO txt folder is refused."""
    return _convert_folder(Path(root).expanduser(), names, cache_dir, keep_difficult, split_seed, split,
                           voc_only=True)


def _from_yaml(path: Path) -> DetectionData:
    cfg = read_yaml(path, "YOLO data yaml")
    if not isinstance(cfg, dict) or "names" not in cfg or "train" not in cfg:
        raise PrunekitError(f"{path} is not a YOLO data yaml (it needs train: and names:)")
    data = DetectionData(path, _yaml_names(cfg, path))
    for split in (s for s in SPLITS if cfg.get(s)):
        check_labels(data, split)
    _warn_problems(path.name, data)
    return data


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
