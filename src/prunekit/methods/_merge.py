"""imp-sim's stage 2 maths: how linearly similar a group's channels are at each layer reading them, and the
merge that lets a partner stand in for a removed channel with weight compensation (``imp_sim`` steps 3-4).

The moments of each layer's view of a group give the least-squares fit x_j ≈ a·x_i + b of every ordered pair
and its R²; merging j into i adds a·W[:, j] to W[:, i] in every reading layer and folds the constant b·ΣW[:, j]
where it is exact (``PruneGraph.fold_constant``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph import IN_CHANNEL_FNS, PruneGraph
from ..measure import hooked


# ---- 3. stage 2: linear similarity at every reading layer ----
class Moments:
    """Running first and second moments of one layer's view of a group's C channels (float64).

    Enough for the least-squares fit of every ordered pair at once; summed about the first batch's
    mean so that near-constant channels keep their variance through the subtraction.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s: torch.Tensor | float = 0.0
        self.ss: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        """Add samples ``x`` of shape (C, samples)."""
        x = x.detach().double()
        if self.shift is None:
            self.shift = x.mean(1, keepdim=True)
        x = x - self.shift
        self.n += x.shape[1]
        self.s = self.s + x.sum(1)
        self.ss = self.ss + x @ x.T

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's mean and variance (float64)."""
        d = self.s / self.n
        return self.shift[:, 0] + d, (self.ss / self.n - torch.outer(d, d)).diagonal().clamp_min(0)

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R², a, b), each (C, C) and indexed [j, i]: the fit x_j ≈ a·x_i + b and its R².

        A constant channel (no variance) is fitted exactly by a = 0, b = its value, so R² = 1 with any
        partner; a constant partner explains nothing of a varying channel (R² = 0). No self-pairs.
        """
        d = self.s / self.n
        mu = self.shift[:, 0] + d
        cov = self.ss / self.n - torch.outer(d, d)
        var = cov.diagonal().clamp_min(0)
        flat = var <= 1e-9 * (mu ** 2 + 1e-12)  # constant, up to rounding
        var = torch.where(flat, 1.0, var)
        a = cov / var[None, :]  # slope of x_j on x_i
        r2 = (cov ** 2 / torch.outer(var, var)).clamp(0, 1)
        a[:, flat], r2[:, flat] = 0, 0  # a constant partner explains nothing,
        a[flat], r2[flat] = 0, 1  # but a constant is fitted by b alone
        r2.fill_diagonal_(0)
        b = mu[:, None] - a * mu[None, :]
        return r2.float(), a.float(), b.float()


def readers(pg: PruneGraph, gi: int) -> dict[nn.Module, torch.Tensor] | None:
    """Every layer reading group ``gi``, with its input indices per channel, shape (size, per); None if
    the group cannot merge (read by a depthwise or grouped conv, twice by one layer, or nowhere foldable)."""
    g = pg.groups[gi]
    if g.chunks > 1:
        return None
    views: dict[nn.Module, torch.Tensor] = {}
    for mod, handler, idx in pg.member_indices(gi, list(range(g.size))):
        if getattr(mod, "groups", 1) > 1:
            return None
        if handler not in IN_CHANNEL_FNS:
            continue
        if mod in views or len(idx) % g.size or not pg.can_fold(mod):
            return None
        views[mod] = torch.tensor(idx).view(g.size, -1)
    return views or None


@torch.no_grad()
def similarity(model: nn.Module, views: dict[int, dict[nn.Module, torch.Tensor]],
               batches: list[tuple[torch.Tensor, ...]]) -> dict[int, dict[nn.Module, Moments]]:
    """Moments of each group's channels at the input of each layer reading it, over the calibration batches."""
    moments = {gi: {m: Moments() for m in v} for gi, v in views.items()}
    taps: dict[nn.Module, list[tuple[torch.Tensor, Moments]]] = {}
    for gi, v in views.items():
        for m, idx in v.items():
            taps.setdefault(m, []).append((idx, moments[gi][m]))

    def record(m: nn.Module, inp: tuple, _out: Any) -> None:
        x = inp[0] if isinstance(m, nn.Linear) else inp[0].movedim(1, -1)  # channels last
        x = x.reshape(-1, x.shape[-1])
        for idx, mom in taps[m]:  # channel c's samples: every position of its indices, aligned across channels
            size, per = idx.shape
            mom.add(x[:, idx.flatten().to(x.device)].view(-1, size, per).transpose(0, 1).reshape(size, -1))

    with hooked(model, [(m, record) for m in taps]):
        for batch in batches:
            model(batch[0])
    return moments


def pair_scores(fits: dict[nn.Module, tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """R² of each ordered pair [j, i] for the group: the lowest over its reading layers (all must agree)."""
    return torch.stack([r2 for r2, _, _ in fits.values()]).amin(0)


# ---- 4. merge with compensation ----
@torch.no_grad()
def merge(pg: PruneGraph, views: dict[nn.Module, torch.Tensor], fits: dict[nn.Module, tuple[torch.Tensor, ...]],
          j: int, i: int) -> None:
    """Let channel i stand in for channel j in every reading layer (call before j is removed)."""
    for m, idx in views.items():
        _, a, b = fits[m]
        w = m.weight
        w[:, idx[i]] += a[j, i].to(w.dtype) * w[:, idx[j]]
        if b[j, i] != 0:
            pg.fold_constant(m, idx[j].tolist(), b[j, i].expand(idx.shape[1]).clone())

