"""Data sets held in memory as uint8 tensors, and fast batch loaders over them.

Training on a small CPU is bound by input handling, so every source (scikit-learn digits,
CIFAR-10, any ImageFolder tree, synthetic tensors) is decoded once into one uint8 tensor per split
(cached on disk for folders) and batches are sliced, augmented and normalised as tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

from ._folder import default_cache_dir, is_archive, load_archive_pair, load_folder_pair, split_dirs
from ._imageset import ImageSet, stratified_first
from ._loader import Loader

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DataBundle", "ImageSet", "Loader", "example_inputs", "load"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class DataBundle:
    """Train and test splits plus what a model and its loaders need to know about them."""

    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True  # False where mirrored images change the class (digits)
    val: ImageSet | None = None  # held out of the *training* data by ``holdout``, for decisions
    val_indices: torch.Tensor | None = None  # positions of ``val`` in the original training split

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return (c, h, w)

    def loaders(
        self,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        augment: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        channels_last: bool = False,
    ) -> tuple[Loader, Loader]:
        """(train, test) loaders: train shuffles and augments, test keeps order and pixels as they are."""
        pad = 4 if min(self.input_shape[1:]) >= 32 else 1  # 4 px of 32 is the CIFAR recipe; 8x8 digits take 1
        make = partial(
            Loader,
            mean=self.mean,
            std=self.std,
            batch_size=batch_size,
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )
        return make(self.train, shuffle=True, augment=augment, pad=pad, flip=self.hflip), make(self.test)

    def holdout(self, fraction: float, seed: int = 0) -> DataBundle:
        """This bundle with a seeded, class-stratified ``fraction`` of the training split moved to ``val``.

        Data-driven methods and model selection score on ``val``; the test split stays untouched
        until the final table. The same ``seed`` always holds out the same images.
        """
        if not 0 < fraction < 1:
            raise PrunekitError(f"validation fraction must be in (0, 1), got {fraction}")
        n = len(self.train)
        n_val = max(1, round(fraction * n))
        if n - n_val < 1:
            raise PrunekitError(f"the training split has {n} images: too few to hold out a validation split")
        val_idx = stratified_first(self.train.labels, n_val, seed)
        keep = torch.ones(n, dtype=torch.bool)
        keep[val_idx] = False
        return replace(self, train=self.train.subset(keep.nonzero().squeeze(1)), val=self.train.subset(val_idx),
                       val_indices=val_idx)

    def eval_loader(self, split: ImageSet, batch_size: int = 256, device: str | torch.device = "cpu",
                    *, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> Loader:
        """Batches of ``split`` as the model sees them at test time (no augmentation)."""
        return Loader(split, self.mean, self.std, batch_size=batch_size, device=device, shuffle=shuffle, seed=seed,
                      rank=rank, world_size=world_size)


def example_inputs(bundle: DataBundle, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """Real, normalised training images (a seeded, class-stratified pick) for tracing and probing.

    Methods probe activations on them (β compensation, residual-block discovery), so they must look
    like what the model sees, not an all-zero image.
    """
    idx = stratified_first(bundle.train.labels, min(batch, len(bundle.train)), seed)
    x = bundle.train.images[idx].float().div_(255)
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (x - mean) / std


def load(
    spec: str,
    root: str | Path | None = None,
    *,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
    test_root: str | Path | None = None,
) -> DataBundle:
    """Load a data set by name ("digits", "cifar10", "synthetic") or ImageFolder path into memory.

    `root` locates CIFAR-10 (extracted folder, .tar.gz, or torchvision's cifar-10-batches-py) or,
    with spec "folder", the data folder; `test_root` makes the folder the train split and names a
    separate test folder. `limit` keeps a seeded, class-stratified subset of each split.
    """
    if not isinstance(spec, str) or not spec:
        raise PrunekitError(f"data set must be a name (digits, cifar10, synthetic) or a folder path, got {spec!r}")
    bundle = _load(spec, root, image_size=image_size, cache_dir=cache_dir, download=download, limit=limit,
                   seed=seed, test_root=test_root)
    if len(torch.unique(bundle.train.labels)) < 2:
        raise PrunekitError(f"data set {bundle.name} has fewer than two classes in its training split: a "
                            "classifier cannot learn anything from it; check the folder layout (one folder per class)")
    return bundle


def _load(
    spec: str,
    root: str | Path | None,
    *,
    image_size: int | None,
    cache_dir: str | Path | None,
    download: bool,
    limit: int | None,
    seed: int,
    test_root: str | Path | None,
) -> DataBundle:
    if limit is not None and limit < 1:
        raise PrunekitError(f"limit must be at least 1, got {limit}")
    if image_size is not None and image_size < 1:
        raise PrunekitError(f"image size must be at least 1, got {image_size}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = spec.lower()
    if name == "digits":
        return _digits(image_size, limit, seed)
    if name == "synthetic":
        return _synthetic(limit, image_size or 32, seed)
    if name == "cifar10":
        return _cifar10(root, image_size, cache, download, limit, seed)
    if name == "folder":
        if root is None:
            raise PrunekitError("data set 'folder' needs a root path; pass the ImageFolder directory")
        path = Path(root).expanduser()
    else:
        path = Path(spec).expanduser()
        if not path.exists() and not any(ch in spec for ch in "/\\.~"):
            raise PrunekitError(
                f"unknown data set {spec!r}; use digits, cifar10, synthetic, or a folder path"
            )
    train, test = _folder_pair(path, test_root, image_size, cache, limit, seed)
    mean, std = _channel_stats(train.images)
    return DataBundle(str(path), train, test, mean, std)


def _finish(
    train: ImageSet, test: ImageSet, image_size: int | None, limit: int | None, seed: int
) -> tuple[ImageSet, ImageSet]:
    """Resize and limit in-memory splits (folder sources do both while decoding instead)."""
    if limit is not None:
        train = train.subset(stratified_first(train.labels, limit, seed))
        test = test.subset(stratified_first(test.labels, limit, seed))
    if image_size is not None:
        train, test = train.resized(image_size), test.resized(image_size)
    return train, test


def _folder_pair(
    path: Path,
    test_root: str | Path | None,
    image_size: int | None,
    cache: Path,
    limit: int | None,
    seed: int,
) -> tuple[ImageSet, ImageSet]:
    """Train/test sets from a folder with train/ and test/, a .tar.gz of one, or a train+test pair."""
    if not path.exists():
        raise PrunekitError(f"data path {path} does not exist; pass an existing folder or archive")
    if test_root is not None:
        return load_folder_pair(path, Path(test_root).expanduser(), image_size, cache, limit, seed)
    if is_archive(path):
        return load_archive_pair(path, image_size, cache, limit, seed)
    if not path.is_dir():
        raise PrunekitError(f"data path {path} is neither a folder nor a .tar/.tar.gz archive")
    pair = split_dirs(path)
    if pair is None:
        raise PrunekitError(
            f"data folder {path} has no train/ and test/ subfolders; add them or pass a separate test_root"
        )
    return load_folder_pair(*pair, image_size, cache, limit, seed)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units, accumulated in float64 chunks to bound memory."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.transpose(0, 1).reshape(c, -1).double()
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = images.numel() // c
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-3).tolist())


def _digits(image_size: int | None, limit: int | None, seed: int) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: a real data set that needs no download and trains in seconds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, stratify=labels.numpy(), random_state=seed
    )
    classes = [str(d) for d in range(10)]
    train = ImageSet(images[train_idx], labels[train_idx], classes)
    test = ImageSet(images[test_idx], labels[test_idx], list(classes))
    train, test = _finish(train, test, image_size, limit, seed)
    mean, std = _channel_stats(train.images)
    return DataBundle("digits", train, test, mean, std, hflip=False)


def _synthetic(limit: int | None, size: int, seed: int, num_classes: int = 10) -> DataBundle:
    """Learnable random images for tests: a smooth per-class pattern under per-pixel noise.

    `limit` sets the train size (test gets a quarter). The patterns are mirror-symmetric, so the
    default flip augmentation keeps them learnable.
    """
    n_train = limit or 512
    n_test = max(1, n_train // 4)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=gen)
    patterns = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    patterns = (patterns + patterns.flip(-1)) / 2
    classes = [f"class{i}" for i in range(num_classes)]

    def make(n: int) -> ImageSet:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        pixels = 128 + 50 * patterns[labels] + 25 * torch.randn(n, 3, size, size, generator=gen)
        return ImageSet(pixels.round().clamp(0, 255).to(torch.uint8), labels, list(classes))

    train, test = make(n_train), make(n_test)
    mean, std = _channel_stats(train.images)
    return DataBundle("synthetic", train, test, mean, std)


def _cifar10(
    root: str | Path | None, image_size: int | None, cache: Path, download: bool, limit: int | None, seed: int
) -> DataBundle:
    """CIFAR-10 from an extracted ImageFolder, its .tar.gz, or torchvision's python batches."""
    if root is None:
        downloaded = cache / "cifar10"
        if not download and not (downloaded / "cifar-10-batches-py").is_dir():
            raise PrunekitError(
                "CIFAR-10 needs a path: pass the extracted folder or its .tar.gz, or use --download"
            )
        train, test = _finish(*_torchvision_cifar10(downloaded, download), image_size, limit, seed)
    else:
        path = Path(root).expanduser()
        if path.name == "cifar-10-batches-py" and path.is_dir():
            path = path.parent
        if is_archive(path) or (path.is_dir() and split_dirs(path) is not None):
            train, test = _folder_pair(path, None, image_size, cache, limit, seed)
        elif (path / "cifar-10-batches-py").is_dir() or download:
            train, test = _finish(*_torchvision_cifar10(path, download), image_size, limit, seed)
        elif not path.exists():
            raise PrunekitError(
                f"CIFAR-10 path {path} does not exist; pass the extracted folder or .tar.gz, or --download"
            )
        else:
            raise PrunekitError(
                f"CIFAR-10 path {path} is not a train/+test/ folder, a .tar.gz of one, or cifar-10-batches-py"
            )
    return DataBundle("cifar10", train, test, CIFAR10_MEAN, CIFAR10_STD)


def _torchvision_cifar10(root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    """The python-pickle CIFAR-10 that torchvision downloads: already uint8 arrays, no decoding."""
    from torchvision.datasets import CIFAR10

    sets = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except (RuntimeError, OSError) as e:
            hint = "check the network" if download else "pass --download or the extracted folder / .tar.gz"
            raise PrunekitError(f"cannot load CIFAR-10 from {root} ({e}); {hint}") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        sets.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    return sets[0], sets[1]
