"""The in-memory image set every source produces, so loaders never touch the disk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Whole split as one uint8 tensor: slicing it is far cheaper than per-sample decoding."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Keep the samples at `index`, in that order."""
        return ImageSet(self.images[index].contiguous(), self.labels[index].contiguous(), list(self.classes))

    def resized(self, size: int) -> ImageSet:
        """Square-resize with antialiasing, chunked so a large set never becomes one huge float copy."""
        if self.images.shape[-2:] == (size, size):
            return self
        chunks = [
            F.interpolate(
                chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for chunk in self.images.split(4096)
        ]
        return ImageSet(torch.cat(chunks), self.labels, list(self.classes))


def stratified_first(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Indices of the first `limit` samples of a seeded shuffle that interleaves the classes.

    Every prefix of that order holds the classes in proportion to their frequency, so a small
    `limit` still sees all classes. Returned sorted, so a subset keeps the original sample order.
    """
    n = len(labels)
    if limit >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    counts = torch.bincount(lab)
    by_class = torch.argsort(lab, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(lab)
    rank[by_class] = torch.arange(n) - starts[lab[by_class]]
    position = (rank.double() + 0.5) / counts[lab].double()
    return perm[torch.argsort(position, stable=True)[:limit]].sort().values
