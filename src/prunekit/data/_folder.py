"""ImageFolder and tarball decoding, and the on-disk tensor cache.

Decoding tens of thousands of small JPEGs costs seconds on a small CPU, so the decoded uint8
tensors are cached on disk and reloaded in well under a second afterwards.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError

from ._imageset import ImageSet, stratified_first

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SPLITS = ("train", "test")
_CACHE_VERSION = "prunekit-images-v1"
_CHUNK = 256  # images per thread-pool task: amortises the executor overhead over many tiny decodes


def default_cache_dir() -> Path:
    """`PRUNEKIT_CACHE` if set, else ~/.cache/prunekit."""
    return Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit").expanduser()


def cache_key(*parts: object) -> str:
    """Stable key from the things that decide a cache entry's content."""
    return hashlib.sha1(repr((_CACHE_VERSION, *parts)).encode()).hexdigest()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class Listing:
    """Images of one split in label order: file paths, or archive member names with their bytes."""

    where: str  # the split's folder (or archive:split), for messages
    names: list[str]
    labels: torch.Tensor
    classes: list[str]
    blobs: list[bytes] | None = None


def _listing(where: str, by_class: dict[str, list[tuple[str, bytes | None]]], what: str) -> Listing:
    """Order classes alphabetically (= label order) and files by name; an empty class is an error."""
    if not by_class:
        raise PrunekitError(f"{what} {where} has no class subfolders; expected {where}/<class>/<image>")
    names: list[str] = []
    blobs: list[bytes | None] = []
    labels: list[int] = []
    classes = sorted(by_class)
    for label, cls in enumerate(classes):
        files = sorted(by_class[cls])
        if not files:
            raise PrunekitError(f"class folder {where}/{cls} contains no images; add images or remove it")
        names += [name for name, _ in files]
        blobs += [blob for _, blob in files]
        labels += [label] * len(files)
    in_memory = [b for b in blobs if b is not None]
    return Listing(where, names, torch.tensor(labels, dtype=torch.int64), classes, in_memory or None)


def scan_folder(root: Path) -> tuple[Listing, str]:
    """List `root/<class>/<image>` and fingerprint the images by content.

    The fingerprint hashes every image's class, name and bytes, so an image added, removed or
    replaced (even with its old mtime kept, as ``cp -p`` or ``rsync -t`` do) gives another cache
    entry; reading the bytes costs a few seconds for CIFAR-10's 50k files, far less than decoding.
    """
    if not root.is_dir():
        raise PrunekitError(f"data folder {root} does not exist; pass an existing ImageFolder directory")
    by_class: dict[str, list[tuple[str, bytes | None]]] = {}
    for class_dir in sorted(os.scandir(root), key=lambda e: e.name):
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        files = by_class[class_dir.name] = []
        for entry in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
            if entry.is_file() and _is_image(entry.name):
                files.append((entry.path, None))
    digest = hashlib.blake2b(digest_size=16)
    for name, files in by_class.items():
        for path, _ in files:
            digest.update(f"{name}/{os.path.basename(path)}\0".encode())
            with open(path, "rb") as f:
                digest.update(hashlib.blake2b(f.read(), digest_size=16).digest())
    return _listing(str(root), by_class, "data folder"), digest.hexdigest()


def scan_archive(archive: Path) -> tuple[Listing, Listing]:
    """Read `[top/]train|test/<class>/<image>` members straight from a tarball, in one pass.

    Streaming the archive is far cheaper than extracting it (about 5 s against 20 s for the 60k
    CIFAR-10 JPEGs), and nothing is written, so no member can escape a target directory; unsafe
    names are still refused because they mean the archive is not what it claims to be.
    """
    found: dict[str, dict[str, list[tuple[str, bytes | None]]]] = {split: {} for split in _SPLITS}
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise PrunekitError(
                        f"archive {archive} contains unsafe path {member.name!r}; refusing to read it"
                    )
                if parts and parts[0] not in _SPLITS:
                    parts = parts[1:]  # a single wrapping folder, as in cifar10/train/...
                if len(parts) < 2 or parts[0] not in _SPLITS:
                    continue
                files = found[parts[0]].setdefault(parts[1], [])
                if len(parts) == 3 and member.isfile() and _is_image(parts[2]):
                    blob = tf.extractfile(member)
                    files.append((member.name, blob.read() if blob else b""))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise PrunekitError(f"cannot read archive {archive} ({e}); re-download or replace it") from e
    if not found["train"] or not found["test"]:
        raise PrunekitError(
            f"archive {archive} has no train/ and test/ class folders; expected an ImageFolder pair"
        )
    train, test = (_listing(f"{archive}:{split}", found[split], "archive split") for split in _SPLITS)
    return train, test


def _open_rgb(name: str, blob: bytes | None, image_size: int | None) -> np.ndarray:
    """Decode one image to H x W x 3 uint8; any decoding failure becomes a one-line user error."""
    try:
        with Image.open(io.BytesIO(blob) if blob is not None else name) as im:
            rgb = im if im.mode == "RGB" else _to_8bit(im).convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb)
    except Exception as e:  # PIL's errors, or a hook another library installed (Ultralytics' HEIF fallback)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrunekitError(f"cannot read image {name} ({reason}); remove or replace the file") from e


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled to 8 bits (PIL's convert would clip everything above 255 to white)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        full = 65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255.0
        return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) * (255.0 / full), 0, 255).round()
                               .astype(np.uint8))
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    return im


def decode(listing: Listing, image_size: int | None, keep: list[int] | None = None) -> ImageSet:
    """Decode the listed images (or those at `keep`) into one uint8 N x 3 x H x W tensor.

    Pillow releases the GIL while decoding, so a thread pool scales with image size; for tiny
    images (CIFAR's 32x32) Python overhead dominates and it neither helps nor hurts.
    """
    index = keep if keep is not None else list(range(len(listing.names)))
    blobs = listing.blobs

    def one(i: int) -> np.ndarray:
        return _open_rgb(listing.names[i], blobs[i] if blobs is not None else None, image_size)

    first = one(index[0])
    height, width = first.shape[:2]
    out = np.empty((len(index), height, width, 3), dtype=np.uint8)
    out[0] = first

    def work(start: int, stop: int) -> int:
        for j in range(start, stop):
            img = one(index[j])
            if img.shape[:2] != (height, width):
                raise PrunekitError(
                    f"image {listing.names[index[j]]} is {img.shape[1]}x{img.shape[0]} but "
                    f"{listing.names[index[0]]} is {width}x{height}; pass --image-size N (image_size=N)"
                )
            out[j] = img
        return stop - start

    workers = min(8, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="prunekit-decode") as pool,
        tqdm(
            total=len(index),
            initial=1,
            desc=f"decoding {listing.where}",
            unit="img",
            leave=False,
            disable=None,
        ) as bar,
    ):
        futures = [pool.submit(work, s, min(s + _CHUNK, len(index))) for s in range(1, len(index), _CHUNK)]
        try:
            for fut in as_completed(futures):
                bar.update(fut.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, listing.labels[index], list(listing.classes))


def read_cache(path: Path) -> ImageSet | None:
    """Return the cached set, or None when absent or unusable (a broken file is simply rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels, classes = blob["images"], blob["labels"], blob["classes"]
        ok = (
            images.dtype == torch.uint8
            and images.dim() == 4
            and labels.dtype == torch.int64
            and labels.shape == images.shape[:1]
            and all(isinstance(c, str) for c in classes)
        )
    except Exception as e:  # any unpickling/zip/key error means "corrupt": rebuild rather than fail
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, e)
        return None
    if not ok:
        log.warning("ignoring malformed cache file %s; rebuilding it", path)
        return None
    return ImageSet(images, labels, list(classes))


def write_cache(path: Path, ds: ImageSet) -> None:
    """Atomic write (temp file + fsync + rename) so a crash never leaves a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        log.warning("cannot write cache %s (%s); continuing without it", path, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": ds.images, "labels": ds.labels, "classes": ds.classes}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        log.warning("cannot write cache %s (%s); continuing without it", path, e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_split(
    cache_file: Path, listing: Callable[[], Listing], image_size: int | None, limit: int | None, seed: int
) -> ImageSet:
    """Cached decode of one split.

    With a `limit` and no cache entry only the selected images are decoded (and nothing is cached),
    which keeps smoke runs on big folders fast; the selection equals subsetting the full set.
    """
    ds = read_cache(cache_file)
    if ds is None:
        lst = listing()
        if limit is not None and limit < len(lst.names):
            return decode(lst, image_size, stratified_first(lst.labels, limit, seed).tolist())
        ds = decode(lst, image_size)
        write_cache(cache_file, ds)
    if limit is not None:
        ds = ds.subset(stratified_first(ds.labels, limit, seed))
    return ds


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def split_dirs(root: Path) -> tuple[Path, Path] | None:
    """`root/train` and `root/test`, also when wrapped in a single top-level folder."""
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for base in (root, *(subdirs if len(subdirs) == 1 else [])):
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base / "train", base / "test"
    return None


def load_folder_pair(
    train_dir: Path, test_dir: Path, image_size: int | None, cache_dir: Path, limit: int | None, seed: int
) -> tuple[ImageSet, ImageSet]:
    """Both splits of a train/test ImageFolder pair, cached per split and checked for equal classes."""
    sets = []
    for split in (train_dir, test_dir):
        listing, fingerprint = scan_folder(split)
        key = cache_key(str(split.resolve()), image_size, fingerprint)
        sets.append(
            load_split(cache_dir / f"images-{key}.pt", lambda lst=listing: lst, image_size, limit, seed)
        )
    _check_same_classes(sets[0], sets[1], str(train_dir), str(test_dir))
    return sets[0], sets[1]


def load_archive_pair(
    archive: Path, image_size: int | None, cache_dir: Path, limit: int | None, seed: int
) -> tuple[ImageSet, ImageSet]:
    """Like load_folder_pair, keyed on the archive's identity so a cache hit does not open it."""
    digest = hashlib.blake2b(digest_size=16)  # keyed on content: a replaced archive is read again
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    scanned: list[tuple[Listing, Listing]] = []

    def listing(i: int) -> Listing:
        if not scanned:
            scanned.append(scan_archive(archive))
        return scanned[0][i]

    sets = []
    for i, split in enumerate(_SPLITS):
        key = cache_key(str(archive.resolve()), digest.hexdigest(), split, image_size)
        sets.append(
            load_split(cache_dir / f"images-{key}.pt", lambda i=i: listing(i), image_size, limit, seed)
        )
    _check_same_classes(sets[0], sets[1], f"{archive}:train", f"{archive}:test")
    return sets[0], sets[1]


def _check_same_classes(train: ImageSet, test: ImageSet, train_where: str, test_where: str) -> None:
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise PrunekitError(
            f"class folders differ between {train_where} and {test_where} (only in train: {only_train}, "
            f"only in test: {only_test}); both splits need the same class folders"
        )
