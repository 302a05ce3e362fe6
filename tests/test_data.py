"""Tests for prunekit.data: sources, the decode cache, error messages and the batch loader."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prunekit import data
from prunekit.data import _folder
from prunekit.errors import PrunekitError

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _raises(match_path: object, fn, *args, **kwargs) -> str:
    """Call fn, expect a one-line PrunekitError that names `match_path`; return the message."""
    with pytest.raises(PrunekitError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(match_path) in message, message
    return message


# ---------------------------------------------------------------- digits / synthetic


def test_digits_shapes_split_and_determinism() -> None:
    b = data.load("digits", seed=3)
    assert b.name == "digits"
    assert b.train.images.shape == (1437, 1, 8, 8) and b.test.images.shape == (360, 1, 8, 8)
    assert b.train.images.dtype == torch.uint8 and b.train.labels.dtype == torch.int64
    assert b.num_classes == 10 and b.train.classes == [str(d) for d in range(10)]
    assert b.input_shape == (1, 8, 8) and not b.hflip
    assert int(b.train.images.max()) == 255
    assert torch.bincount(b.test.labels).min() >= 35  # stratified: every digit ~36 times
    again = data.load("digits", seed=3)
    assert torch.equal(again.train.images, b.train.images) and torch.equal(again.test.labels, b.test.labels)
    assert again.mean == b.mean and 0 < b.mean[0] < 1 and 0 < b.std[0] < 1
    other = data.load("digits", seed=4)
    assert not torch.equal(other.test.labels, b.test.labels)


def test_digits_limit_is_stratified() -> None:
    b = data.load("digits", limit=100)
    assert len(b.train) == 100 and len(b.test) == 100
    assert torch.bincount(b.train.labels, minlength=10).tolist() == [10] * 10


def test_synthetic_deterministic_and_learnable() -> None:
    a, b = data.load("synthetic", seed=1), data.load("synthetic", seed=1)
    assert a.train.images.shape == (512, 3, 32, 32) and a.test.images.shape == (128, 3, 32, 32)
    assert a.num_classes == 10 and a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, data.load("synthetic", seed=2).train.images)
    assert len(data.load("synthetic", limit=64).train) == 64
    # nearest class mean already separates the classes, so a network certainly can
    means = torch.stack([a.train.images[a.train.labels == k].float().mean(0) for k in range(10)])
    dist = torch.cdist(a.test.images.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == a.test.labels).float().mean() > 0.9


def test_example_inputs_and_unknown_spec() -> None:
    b = data.load("synthetic", limit=16)
    x = data.example_inputs(b, batch=2)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    _raises("nosuchset", data.load, "nosuchset")
    with pytest.raises(PrunekitError, match="--download"):
        data.load("cifar10", cache_dir="/nonexistent-prunekit-cache")


# ---------------------------------------------------------------- ImageFolder


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _make_folder(root: Path, size: int = 6, per_class: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """train/ and test/ with classes dog, ant (label order: ant, dog); one test image is grayscale."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for cls in ("dog", "ant"):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                if split == "test" and cls == "dog" and i == 0:
                    pixels = pixels[..., 0]  # mode "L"
                path = root / split / cls / f"{i}.png"
                _save(path, pixels)
                written[f"{split}/{cls}/{i}"] = pixels
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return written


def test_folder_loads_in_label_order_with_grayscale(tmp_path: Path) -> None:
    written = _make_folder(tmp_path / "set")
    b = data.load(str(tmp_path / "set"), cache_dir=tmp_path / "cache")
    assert b.name == str(tmp_path / "set")
    assert b.train.classes == ["ant", "dog"] == b.test.classes
    assert b.train.images.shape == (6, 3, 6, 6) and b.test.images.shape == (6, 3, 6, 6)
    assert b.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(b.train.images[4], torch.from_numpy(written["train/dog/1"]).permute(2, 0, 1))
    gray = b.test.images[3]  # test/dog/0.png, converted to RGB
    assert torch.equal(gray[0], torch.from_numpy(written["test/dog/0"])) and torch.equal(gray[0], gray[2])
    expected_mean = b.train.images.float().mean((0, 2, 3)) / 255
    assert np.allclose(b.mean, expected_mean.numpy(), atol=1e-6) and len(b.std) == 3


def test_folder_cache_hit_invalidation_and_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "set", tmp_path / "cache"
    _make_folder(root)
    first = data.load(str(root), cache_dir=cache)
    files = sorted(cache.glob("images-*.pt"))
    assert len(files) == 2

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(_folder, "decode", no_decoding)
        cached = data.load(str(root), cache_dir=cache)
    assert torch.equal(cached.train.images, first.train.images)

    for f in files:  # a truncated/garbage cache file is ignored and rewritten
        f.write_bytes(b"garbage")
    rebuilt = data.load(str(root), cache_dir=cache)
    assert torch.equal(rebuilt.test.images, first.test.images)
    assert all(_folder.read_cache(f) is not None for f in files)

    _save(root / "train" / "dog" / "9.png", np.zeros((6, 6, 3), np.uint8))  # new file -> new fingerprint
    assert len(data.load(str(root), cache_dir=cache).train) == 7


def test_a_replaced_image_with_its_old_mtime_is_read_again(tmp_path: Path) -> None:
    """The decode cache is keyed on content: `cp -p` / `rsync -t` keep mtimes, the images still change."""
    root, cache = tmp_path / "set", tmp_path / "cache"
    _make_folder(root)
    first = data.load(str(root), cache_dir=cache)
    target = root / "train" / "dog" / "0.png"
    st = target.stat()
    _save(target, np.full((6, 6, 3), 7, np.uint8))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(target.parent, ns=(target.parent.stat().st_atime_ns, target.parent.stat().st_mtime_ns))
    again = data.load(str(root), cache_dir=cache)
    assert not torch.equal(again.train.images, first.train.images)
    assert int(again.train.images[3].max()) == 7


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls, level in (("dark", 1000), ("bright", 60000)):
            (tmp_path / "s16" / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((4, 4), level, np.uint16)).save(tmp_path / "s16" / split / cls / "0.png")
    b = data.load(str(tmp_path / "s16"), cache_dir=tmp_path / "cache")
    levels = sorted(int(b.train.images[i].max()) for i in range(2))
    assert levels == [round(1000 * 255 / 65535), round(60000 * 255 / 65535)]  # not both clipped to 255


def test_folder_default_cache_dir_and_test_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_folder(tmp_path / "set")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "envcache"))
    b = data.load("folder", tmp_path / "set" / "train", test_root=tmp_path / "set" / "test")
    assert len(b.train) == 6 and len(b.test) == 6
    assert len(list((tmp_path / "envcache").glob("images-*.pt"))) == 2


def test_folder_limit_without_cache_matches_full_subset(tmp_path: Path) -> None:
    _make_folder(tmp_path / "set", per_class=5)
    small = data.load(str(tmp_path / "set"), cache_dir=tmp_path / "c1", limit=4, seed=7)
    assert not list((tmp_path / "c1").glob("*.pt"))  # partial decodes are not cached
    data.load(str(tmp_path / "set"), cache_dir=tmp_path / "c2")
    from_cache = data.load(str(tmp_path / "set"), cache_dir=tmp_path / "c2", limit=4, seed=7)
    assert torch.equal(small.train.images, from_cache.train.images)
    assert small.train.labels.tolist() == [0, 0, 1, 1]


def test_folder_image_size_resizes_mixed_sizes(tmp_path: Path) -> None:
    _make_folder(tmp_path / "set")
    _save(tmp_path / "set" / "train" / "ant" / "big.png", np.zeros((10, 12, 3), np.uint8))
    _raises(
        tmp_path / "set" / "train" / "ant" / "big.png",
        data.load,
        str(tmp_path / "set"),
        cache_dir=tmp_path / "c",
    )
    b = data.load(str(tmp_path / "set"), cache_dir=tmp_path / "c", image_size=8)
    assert b.train.images.shape == (7, 3, 8, 8) and b.test.images.shape == (6, 3, 8, 8)


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _raises(tmp_path / "missing", data.load, str(tmp_path / "missing"), cache_dir=cache)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    _raises(empty / "train", data.load, str(empty), cache_dir=cache)
    _raises(
        tmp_path / "empty", data.load, str(tmp_path / "empty" / "train"), cache_dir=cache
    )  # no train/test

    root = tmp_path / "set"
    _make_folder(root)
    (root / "train" / "zebra").mkdir()
    _raises(root / "train" / "zebra", data.load, str(root), cache_dir=cache)
    (root / "train" / "zebra").rmdir()

    (root / "test" / "cat").mkdir()
    _save(root / "test" / "cat" / "0.png", np.zeros((6, 6, 3), np.uint8))
    message = _raises(root / "test", data.load, str(root), cache_dir=cache)
    assert "cat" in message
    (root / "test" / "cat" / "0.png").unlink()
    (root / "test" / "cat").rmdir()

    (root / "train" / "dog" / "x.jpg").write_bytes(b"this is not a jpeg")
    message = _raises(root / "train" / "dog" / "x.jpg", data.load, str(root), cache_dir=cache)
    assert "remove" in message


def _tar(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_archive_loads_and_rejects_unsafe_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    px = {
        f"{s}/{c}/{i}.png": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        for s in ("train", "test")
        for c in ("b", "a")
        for i in range(2)
    }
    archive = _tar(tmp_path / "set.tar.gz", {f"wrap/{k}": _png(v) for k, v in px.items()})
    b = data.load(str(archive), cache_dir=tmp_path / "cache")
    assert b.train.classes == ["a", "b"] and b.train.images.shape == (4, 3, 4, 4)
    assert torch.equal(b.test.images[2], torch.from_numpy(px["test/b/0.png"]).permute(2, 0, 1))

    evil = _tar(
        tmp_path / "evil.tar.gz",
        {"../evil.png": _png(px["train/a/0.png"]), **{k: _png(v) for k, v in px.items()}},
    )
    message = _raises(evil, data.load, str(evil), cache_dir=tmp_path / "cache")
    assert "../evil.png" in message


# ---------------------------------------------------------------- CIFAR-10 (real copy)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[data.DataBundle, float, Path]:
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_TAR}")
    cache = tmp_path_factory.mktemp("cifar-cache")
    start = time.perf_counter()
    bundle = data.load("cifar10", CIFAR_TAR, cache_dir=cache)
    return bundle, time.perf_counter() - start, cache


def test_cifar10_contents(cifar: tuple[data.DataBundle, float, Path]) -> None:
    b, _, _ = cifar
    assert b.name == "cifar10" and b.train.classes == CIFAR_CLASSES == b.test.classes
    assert b.train.images.shape == (50000, 3, 32, 32) and b.test.images.shape == (10000, 3, 32, 32)
    assert b.train.images.dtype == torch.uint8
    assert torch.bincount(b.train.labels).tolist() == [5000] * 10
    assert b.mean == data.CIFAR10_MEAN and b.std == data.CIFAR10_STD
    # the archive's first members, decoded by Pillow directly (files are named 0000..4999 per class)
    checked = 0
    with tarfile.open(CIFAR_TAR, "r|gz") as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(".jpg"):
                split, cls, name = member.name.split("/")[-3:]
                ds = b.train if split == "train" else b.test
                index = CIFAR_CLASSES.index(cls) * (len(ds) // 10) + int(name[:-4])
                expected = np.array(Image.open(tf.extractfile(member)).convert("RGB"))
                assert torch.equal(ds.images[index], torch.from_numpy(expected).permute(2, 0, 1))
                checked += 1
                if checked == 3:
                    break


def test_cifar10_cache_is_fast_and_corruption_is_repaired(cifar: tuple[data.DataBundle, float, Path]) -> None:
    b, first_s, cache = cifar
    start = time.perf_counter()
    again = data.load("cifar10", str(CIFAR_TAR), cache_dir=cache)
    cached_s = time.perf_counter() - start
    assert cached_s < 5 or cached_s * 3 < first_s, (first_s, cached_s)
    assert torch.equal(again.train.images, b.train.images)

    limited = data.load("cifar10", CIFAR_TAR, cache_dir=cache, limit=100)
    assert len(limited.train) == 100 and len(limited.test) == 100
    assert torch.bincount(limited.train.labels).tolist() == [10] * 10

    test_file = min(cache.glob("images-*.pt"), key=lambda p: p.stat().st_size)  # the 10k test split
    test_file.write_bytes(test_file.read_bytes()[:1000])
    repaired = data.load("cifar10", CIFAR_TAR, cache_dir=cache)
    assert torch.equal(repaired.test.images, b.test.images)
    assert _folder.read_cache(test_file) is not None


# ---------------------------------------------------------------- Loader


def _tiny_set(n: int = 10, size: int = 8, seed: int = 0) -> data.ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return data.ImageSet(images, torch.arange(n), [str(i) for i in range(n)])


def test_loader_batches_and_normalisation() -> None:
    b = data.load("synthetic", limit=300)
    train, test = b.loaders(batch_size=64, augment=False)
    assert len(train) == 5 and train.num_samples == 300 and len(test) == 2
    batches = list(train)
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
    x = torch.cat([x for x, _ in batches])
    assert x.dtype == torch.float32 and x.shape == (300, 3, 32, 32)
    assert batches[0][1].dtype == torch.int64
    assert x.mean((0, 2, 3)).abs().max() < 1e-3 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-3
    assert torch.equal(torch.cat([y for _, y in test]), b.test.labels)  # test keeps order
    dropped = data.Loader(b.train, b.mean, b.std, batch_size=64, drop_last=True)
    assert len(dropped) == 4 and len(list(dropped)) == 4
    cl = data.Loader(b.train, b.mean, b.std, batch_size=8, channels_last=True)
    assert next(iter(cl))[0].is_contiguous(memory_format=torch.channels_last)


def test_loader_augmentation_is_seeded_per_epoch() -> None:
    b = data.load("synthetic", limit=64)

    def run(loader: data.Loader, epoch: int) -> list[torch.Tensor]:
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    a = data.Loader(b.train, b.mean, b.std, batch_size=16, shuffle=True, augment=True, seed=5)
    c = data.Loader(b.train, b.mean, b.std, batch_size=16, shuffle=True, augment=True, seed=5)
    e3 = run(a, 3)
    assert all(x.shape == (16, 3, 32, 32) for x in e3)
    assert all(torch.equal(x, y) for x, y in zip(e3, run(c, 3), strict=True))
    assert not torch.equal(torch.cat(e3), torch.cat(run(a, 4)))
    # without set_epoch every pass moves on to the next epoch
    fresh = data.Loader(b.train, b.mean, b.std, batch_size=16, shuffle=True, augment=True, seed=5)
    passes = [torch.cat([x for x, _ in fresh]) for _ in range(2)]
    assert not torch.equal(passes[0], passes[1])
    assert torch.equal(passes[1], torch.cat(run(c, 1)))


def test_loader_crops_are_windows_of_reflect_padded_images() -> None:
    ds = _tiny_set(n=32, size=8)
    pad = 3
    loader = data.Loader(ds, (0.0,) * 3, (1 / 255,) * 3, batch_size=32, augment=True, pad=pad, seed=1)
    out = next(iter(loader))[0].round().to(torch.uint8)  # mean 0, std 1/255: raw pixel values
    padded = F.pad(ds.images.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    flips = shifted = 0
    for i in range(8):
        windows = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(out[i].flip(-1) if flip else out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert windows, f"sample {i} is not a window of its reflect-padded image"
        flips += windows[0][2]
        shifted += windows[0][:2] != (pad, pad)
    assert 0 < flips < 8 and shifted > 0  # p=0.5 per sample; offsets vary
    no_flip = data.Loader(ds, (0.0,) * 3, (1 / 255,) * 3, batch_size=32, augment=True, pad=0, flip=False)
    assert torch.equal(next(iter(no_flip))[0].round().to(torch.uint8), ds.images)
    with pytest.raises(PrunekitError, match="padding"):
        data.Loader(ds, (0.0,) * 3, (1.0,) * 3, augment=True, pad=8)


@pytest.mark.parametrize("n", [10, 11])
def test_loader_ddp_shards_are_disjoint_and_equal(n: int) -> None:
    ds = _tiny_set(n=n)
    ranks = [
        data.Loader(ds, (0.5,) * 3, (0.25,) * 3, batch_size=4, shuffle=True, seed=2, rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [torch.cat([y for _, y in loader]) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 2 and len(seen[0]) == len(seen[1]) == 6 - (n == 10)
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(n))
    if n == 10:
        assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_bundle_loaders_pick_pad_and_flip() -> None:
    digits_train, digits_test = data.load("digits", limit=50).loaders(batch_size=16)
    assert digits_train.pad == 1 and not digits_train.flip and digits_train.shuffle and digits_train.augment
    assert not digits_test.shuffle and not digits_test.augment
    synth_train, _ = data.load("synthetic", limit=16).loaders()
    assert synth_train.pad == 4 and synth_train.flip
    assert next(iter(digits_train))[0].shape == (16, 1, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_contract() -> None:
    b = data.load("synthetic", limit=256)
    train, test = b.loaders(batch_size=64, device="cuda")
    train.set_epoch(2)
    first = [x.clone() for x, _ in train]
    train.set_epoch(2)
    assert all(torch.equal(x, y) for x, y in zip(first, (x for x, _ in train), strict=True))
    x, y = next(iter(test))
    assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 32, 32)
    cpu_x, _ = next(iter(b.loaders(batch_size=64)[1]))
    assert torch.allclose(x.cpu(), cpu_x, atol=1e-5)
