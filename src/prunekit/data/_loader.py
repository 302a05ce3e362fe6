"""Batches sliced from an in-memory uint8 set and augmented as whole-batch tensor ops.

No DataLoader worker processes: on a 2-core machine their start-up and IPC cost more than the
work itself, while a vectorised gather over a uint8 batch takes a millisecond (and runs on the GPU
when the target device is CUDA).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch

from prunekit.errors import PrunekitError

from ._imageset import ImageSet

# A CUDA loader keeps the whole uint8 set on the device when it is at most this big: one copy up
# front instead of a host-to-device transfer per batch (CIFAR-10 train is 154 MB).
_DEVICE_RESIDENT_BYTES = 1 << 30


def _mix(*values: int) -> int:
    """Independent, reproducible generator seed for a (seed, epoch, rank) triple."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map positions in [-pad, size + pad) to the source pixel that reflect padding copies there."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class Loader:
    """Iterable of normalised (x, y) batches on `device`; see `set_epoch` for the shuffling contract.

    Each pass uses the current epoch and then advances it, so a training loop that never calls
    `set_epoch` still gets a fresh order and fresh augmentations every epoch; calling
    `set_epoch(e)` before a pass (as with DistributedSampler) pins that pass to epoch `e`.
    """

    def __init__(
        self,
        ds: ImageSet,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        n, c, h, w = ds.images.shape
        if n == 0:
            raise PrunekitError(
                "cannot build a loader over an empty image set; check the data set and --limit"
            )
        if batch_size < 1:
            raise PrunekitError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise PrunekitError(f"rank {rank} is outside world size {world_size}")
        if augment and not 0 <= pad < min(h, w):
            raise PrunekitError(f"crop padding {pad} must be in [0, {min(h, w)}) for {h}x{w} images")
        if len(mean) != c or len(std) != c:
            raise PrunekitError(
                f"mean/std have {len(mean)}/{len(std)} values but the images have {c} channels"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.pad = pad
        self.flip = flip
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self._n = n
        self._epoch = 0
        resident = self.device.type != "cpu" and ds.images.numel() <= _DEVICE_RESIDENT_BYTES
        storage = self.device if resident else torch.device("cpu")
        self._images = ds.images.to(storage)
        self._labels = ds.labels.to(storage)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add on the converted batch
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next pass: its order is a function of seed + epoch only."""
        self._epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (equal on all ranks; padded by repetition like DDP)."""
        return math.ceil(self._n / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """Sample indices this rank visits in `epoch`, in order (same permutation on every rank)."""
        if self.shuffle:
            order = torch.randperm(self._n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self._n)
        total = self.num_samples * self.world_size
        if total > self._n:
            order = order.repeat(math.ceil(total / self._n))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.indices(epoch).to(self._images.device)
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device).manual_seed(_mix(self.seed, epoch, self.rank))
        for b in range(len(self)):
            batch = index[b * self.batch_size : (b + 1) * self.batch_size]
            x = self._images.index_select(0, batch).to(self.device, non_blocking=True)
            y = self._labels.index_select(0, batch).to(self.device, non_blocking=True)
            if gen is not None:
                x = self._crop_flip(x, gen)
            x = x.float().mul_(self._scale).add_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _crop_flip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random crop of the reflect-padded batch plus per-sample h-flip, as one gather on uint8.

        Equivalent to F.pad(mode="reflect") followed by per-sample windows, without materialising
        the padded batch: each output pixel is mapped straight to its source pixel (1 ms for a
        128 x 3 x 32 x 32 batch on one CPU core, 4x faster than pad + unfold + indexing).
        """
        n, c, h, w = x.shape
        dev = x.device
        p = self.pad
        offsets = torch.randint(0, 2 * p + 1, (2, n, 1), generator=gen, device=dev) - p
        rows = _reflect(torch.arange(h, device=dev) + offsets[0], h)  # n x h
        cols = _reflect(torch.arange(w, device=dev) + offsets[1], w)  # n x w
        if self.flip:
            flipped = torch.rand(n, 1, generator=gen, device=dev) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        pixels = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return x.reshape(n, c, h * w).gather(2, pixels).view(n, c, h, w)
