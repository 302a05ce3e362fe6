"""Turn importance scores into keep/remove decisions.

Two ranking modes reach a MACs ``speedup`` target: *local* removes the same fraction of every
group (Li et al., FPGM), *global* removes the lowest scores across groups after dividing each
group's scores by its mean (DepGraph) or, for BN scales, by raw value (network slimming). Both
search their knob by bisection on the graph's analytic MACs, so no trial pruning is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import PrunekitError
from .graph import PruneGraph

TOLERANCE = 0.03


def _bisect(pg: PruneGraph, speedup: float, keep_at: Callable[[float], dict[int, int]], lo: float = 0.0,
            hi: float = 1.0, iters: int = 50) -> dict[int, int]:
    """Search x in [lo, hi] (speedup non-decreasing in x) for the keep map closest to ``speedup``."""
    base = pg.macs()
    ratio = lambda keep: base / max(pg.macs(keep), 1)  # noqa: E731
    if ratio(keep_at(hi)) < speedup * (1 - TOLERANCE):
        raise PrunekitError(
            f"speedup {speedup:g} is out of reach: pruning every group down to min_keep={pg.min_keep} gives "
            f"{ratio(keep_at(hi)):.2f}x; lower the target or min_keep"
        )
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ratio(keep_at(mid)) < speedup:
            lo = mid
        else:
            hi = mid
    # The knob moves many groups at once near the target; walk from one side of the bracket to the
    # other one group at a time so the achieved ratio can land close to the target.
    below, above = keep_at(lo), keep_at(hi)
    path, cur = [below], dict(below)
    for gi in (gi for gi in above if above[gi] != below[gi]):
        cur[gi] = above[gi]
        path.append(dict(cur))
    return min(path, key=lambda k: abs(ratio(k) - speedup))


def uniform_keep(pg: PruneGraph, ratio: float) -> dict[int, int]:
    """Keep counts when every group loses the fraction ``ratio`` of its channels."""
    return {g.index: pg.clamp_keep(g, g.size - int(g.size * ratio)) for g in pg.groups}


def local_keep_for_speedup(pg: PruneGraph, speedup: float) -> dict[int, int]:
    """Per-group keep counts for a uniform ratio that lands on ``speedup``."""
    if speedup <= 1.0:
        return {g.index: g.size for g in pg.groups}
    return _bisect(pg, speedup, lambda r: uniform_keep(pg, r), 0.0, 1.0)


def threshold_keep(pg: PruneGraph, scores: dict[int, torch.Tensor], t: float) -> dict[int, int]:
    """Keep counts when every channel scoring below ``t`` goes (within min_keep / round_to)."""
    return {gi: pg.clamp_keep(pg.groups[gi], int((s >= t).sum())) for gi, s in scores.items()}


def normalise(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Divide each group's scores by their mean so groups of different scale compete fairly."""
    return {gi: s / s.mean().clamp_min(1e-12) for gi, s in scores.items()}


def global_keep_for_speedup(pg: PruneGraph, scores: dict[int, torch.Tensor], speedup: float) -> dict[int, int]:
    """Keep counts from one global score threshold chosen to land on ``speedup``."""
    if speedup <= 1.0 or not scores:
        return {gi: pg.groups[gi].size for gi in scores}
    # Rank all channels once (stable, so ties fall in index order): x is the fraction of the ranking
    # removed, which moves one channel at a time even when many scores tie.
    owner = torch.cat([torch.full((len(s),), gi) for gi, s in scores.items()])
    order = owner[torch.argsort(torch.cat(list(scores.values())), stable=True)]

    def keep_at(x: float) -> dict[int, int]:
        removed = torch.bincount(order[: int(x * len(order))], minlength=len(pg.groups))
        return {gi: pg.clamp_keep(pg.groups[gi], len(s) - int(removed[gi])) for gi, s in scores.items()}

    return _bisect(pg, speedup, keep_at, 0.0, 1.0, iters=40)


def percentile_keep(pg: PruneGraph, scores: dict[int, torch.Tensor], percent: float) -> dict[int, int]:
    """Network slimming's rule: remove channels below the global ``percent``-th score percentile."""
    if not 0 <= percent < 100:
        raise PrunekitError(f"percentile must be in [0, 100), got {percent}")
    values = torch.cat(list(scores.values()))
    t = float(torch.quantile(values, percent / 100)) if percent > 0 else float("-inf")
    return threshold_keep(pg, scores, t)


def lowest(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``len - keep`` lowest scores (stable for ties)."""
    order = torch.argsort(scores, stable=True)
    return order[: len(scores) - keep].tolist()
