"""Turn importance scores into keep/remove decisions.

Two ranking modes reach a MACs ``speedup`` target: *local* removes the same fraction of every
group (Li et al., FPGM), *global* removes the lowest scores across groups after dividing each
group's scores by its mean (DepGraph) or, for BN scales, by raw value (network slimming). Both
search their knob by bisection on the graph's analytic MACs, so no trial pruning is needed. Under a
latency target (``prunekit.latency``) the same bisection runs on the table's predicted latency, and
each keep decision is snapped to widths the table shows are fast.

A third way needs no target at all: ``learn_threshold`` learns the cut from the shape of the
score distribution itself (a two-component mixture, S0 adaptive-slim).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq

from .errors import PrunekitError
from .graph import PruneGraph

TOLERANCE = 0.03


def _bisect(pg: PruneGraph, speedup: float, keep_at: Callable[[float], dict[int, int]], lo: float = 0.0,
            hi: float = 1.0, iters: int = 50) -> dict[int, int]:
    """Search x in [lo, hi] (speedup non-decreasing in x) for the keep map closest to ``speedup``.

    With a latency table as the graph's cost model the ratio is the predicted one, every keep map is snapped
    to fast widths, and landing is left to the end-to-end measurement. An out-of-reach error carries the most that
    pruning reaches as ``reachable``.
    """
    table = pg.cost_model
    if table is not None:
        keep_at = (lambda raw: lambda x: table.snap(pg, raw(x)))(keep_at)
    base = pg.macs()
    ratio = lambda keep: base / max(pg.macs(keep), 1)  # noqa: E731
    if ratio(keep_at(hi)) < speedup * (1 - TOLERANCE):
        kept = "".join(f"; {name!r} keeps its widths ({why})" for name, why in list(pg.protected.items())[:3])
        err = PrunekitError(
            f"speedup {speedup:g} is out of reach: pruning every group down to min_keep={pg.min_keep} gives "
            f"{ratio(keep_at(hi)):.2f}x; lower the target or min_keep{kept}"
        )
        err.reachable = ratio(keep_at(hi))
        raise err
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
    best = min(path, key=lambda k: abs(ratio(k) - speedup))
    if abs(ratio(best) - speedup) > TOLERANCE * speedup and table is None:
        raise PrunekitError(
            f"cannot land within {TOLERANCE:.0%} of speedup {speedup:g}: the closest reachable is {ratio(best):.2f}x "
            f"(min_keep={pg.min_keep}, round_to={pg.round_to}); "
            "try the other ranking (local or global) or a smaller round_to")
    return best


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


def lowest(scores: torch.Tensor, keep: int, chunks: int = 1) -> list[int]:
    """Indices of the ``len - keep`` lowest scores (stable for ties).

    With ``chunks`` > 1 (a group feeding grouped convs) the score of a position is summed over the
    equal channel blocks and the same lowest positions are removed from every block.
    """
    if chunks > 1:
        per = len(scores) // chunks
        pos = torch.argsort(scores.view(chunks, per).sum(0), stable=True)[: (len(scores) - keep) // chunks]
        return sorted(int(p) + c * per for c in range(chunks) for p in pos)
    order = torch.argsort(scores, stable=True)
    return order[: len(scores) - keep].tolist()


# ---- learned threshold (S0 adaptive-slim; reusable for any score distribution) ----
@dataclass
class ThresholdFit:
    """A two-component mixture fitted to scores, and the threshold it implies (None: prune nothing).

    Component 0 is the "negligible" one, 1 the "important" one. ``weights``, ``means``, ``stds`` and
    ``cut`` live in the fitted space (log10 of the values when ``log``) and ``samples`` are the fitted
    values, so the histogram, both weighted component densities and the cut can be plotted from this alone.
    """

    threshold: float | None  # in the values' own units: values below it are negligible
    cut: float | None  # the same threshold in the fitted space
    weights: tuple[float, float]
    means: tuple[float, float]
    stds: tuple[float, float]
    bimodal: bool
    method: str  # "em" (two-Gaussian mixture), "em-k" (3-5, split between neighbours) or "otsu" (fallback)
    separation: float  # Ashman's D of the two components
    valley: float  # smoothed density at its lowest between the means / at the lower of the two means
    reason: str  # why nothing is pruned; "" when bimodal
    log: bool = True
    samples: list[float] = field(default_factory=list, repr=False)

    def densities(self, grid: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted component densities on ``grid`` (fitted space), to overlay on a density histogram."""
        g = np.asarray(grid, dtype=float)
        lo, hi = (w * np.exp(-0.5 * ((g - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
                  for w, m, s in zip(self.weights, self.means, np.maximum(self.stds, 1e-12), strict=True))
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _otsu(x: np.ndarray, bins: int = 128) -> tuple[float, float]:
    """Otsu's split of the histogram of ``x``: (threshold, effectiveness η = between / total variance)."""
    h, edges = np.histogram(x, bins)
    mid = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(h)[:-1] / x.size  # weight and first moment of the class below each inner edge
    m0 = np.cumsum(h * mid)[:-1] / x.size
    mean = float((h * mid).sum() / x.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.nan_to_num((mean * w0 - m0) ** 2 / (w0 * (1 - w0)), nan=-1.0, posinf=-1.0)
    k = int(np.argmax(between))
    return float(edges[k + 1]), float(between[k] / x.var())


def _mixture(x: np.ndarray, parts: Sequence[np.ndarray], floor: float, max_iter: int):
    """A 1-D Gaussian mixture (scikit-learn EM), one component started on each part of a split of ``x``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    sd = np.maximum([p.std() for p in parts], floor)
    gm = GaussianMixture(len(parts), covariance_type="spherical", reg_covar=floor ** 2, max_iter=max_iter, tol=1e-7,
                         weights_init=np.array([p.size for p in parts]) / x.size,
                         means_init=[[p.mean()] for p in parts], precisions_init=1 / sd ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x[:, None])
    return gm


def _sorted(gm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, means, stds) of a fitted mixture, components in increasing order of their means."""
    order = np.argsort(gm.means_[:, 0])
    return gm.weights_[order], gm.means_[order, 0], np.sqrt(gm.covariances_[order])


def _em(x: np.ndarray, floor: float):
    """Best of a few EM fits of a 1-D two-Gaussian mixture (scikit-learn), started from splits of the data.

    Starts: Otsu's split and the 10/50/90 % quantiles (EM finds a thin low mode from a split near it,
    not from k-means). A fit whose smaller component holds almost nothing has collapsed and is
    skipped; None if every start did. ``floor`` keeps a component from shrinking onto one value.
    Returns (weights, means, stds, BIC).
    """
    col = x[:, None]
    best, best_ll = None, None
    for t in (_otsu(x)[0], *np.quantile(x, (0.1, 0.5, 0.9))):
        lo, hi = x[x < t], x[x >= t]
        if lo.size == 0 or hi.size == 0:
            continue
        gm = _mixture(x, (lo, hi), floor, max_iter=200)
        ll = float(gm.score(col))
        if not np.isfinite(ll) or gm.weights_.min() < 1e-9:
            continue
        if best is None or ll > best_ll:
            best, best_ll = gm, ll
    return None if best is None else (*_sorted(best), best.bic(col))


def _em_many(x: np.ndarray, floor: float, ks: Sequence[int] = (3, 4, 5)):
    """The BIC-best mixture of 3 to 5 Gaussians as (weights, means, stds, BIC), or None: the shape sparsity
    training leaves when the negligible scores pile up in a skewed heap with a long tail towards the
    important mode (seen on YOLO after 40 epochs), which two Gaussians cannot place. Started, like
    ``_em``, from quantile splits."""
    col, best = x[:, None], None
    xs = np.sort(x)
    for k in ks:
        parts = np.split(xs, np.searchsorted(xs, np.quantile(x, np.arange(1, k) / k)))
        if min(p.size for p in parts) == 0:
            continue
        gm = _mixture(x, parts, floor, max_iter=300)
        if gm.weights_.min() > 1e-9 and (best is None or gm.bic(col) < best.bic(col)):
            best = gm
    return None if best is None else (*_sorted(best), best.bic(col))


def _crossing(w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> float | None:
    """Where the weighted component densities cross between the two means (None if they do not)."""

    def diff(z: float) -> float:
        return float(np.log(w[0] / sd[0]) - 0.5 * ((z - mu[0]) / sd[0]) ** 2
                     - np.log(w[1] / sd[1]) + 0.5 * ((z - mu[1]) / sd[1]) ** 2)

    return float(brentq(diff, mu[0], mu[1])) if diff(mu[0]) > 0 > diff(mu[1]) else None


def _valley(x: np.ndarray, lo: float, hi: float) -> float:
    """Lowest smoothed density between ``lo`` and ``hi`` over the lower density at the two ends.

    A Gaussian KDE on a fine histogram: near 0 across a real gap, near 1 on a flat or single-humped
    distribution, which a two-Gaussian fit splits all the same. Silverman's bandwidth rule on the
    geometric mean of std and IQR/1.34: the std alone smears a wide low population into the valley,
    the IQR alone lets a few stray values of a small sample (e.g. block scores) look like a mode.
    """
    iqr = float(np.subtract(*np.quantile(x, (0.75, 0.25))))
    h = 0.9 * (np.sqrt(x.std() * iqr / 1.34) if iqr > 0 else x.std()) * x.size ** -0.2
    counts, edges = np.histogram(x, 1024)
    grid = np.linspace(lo, hi, 201)
    dens = (counts * np.exp(-0.5 * ((grid[:, None] - (edges[:-1] + edges[1:]) / 2) / h) ** 2)).sum(1)
    return float(dens.min() / max(min(dens[0], dens[-1]), 1e-300))


def learn_threshold(values: torch.Tensor | np.ndarray | Sequence[float], *, log: bool = True,
                    min_weight: float = 0.01, min_separation: float = 2.0, max_valley: float = 0.5,
                    min_ratio: float = 3.0, min_otsu_eta: float = 0.85) -> ThresholdFit:
    """Learn where "negligible" scores end from their own distribution, or decide that nothing is.

    EM fits a two-Gaussian mixture to log10|values| (``log``; zeros count as the smallest non-zero
    magnitude instead of forming a cluster of their own at -inf) and the cut is where the weighted
    component densities cross between the two means (the "optimal threshold" of Ye et al. 2020).
    Nothing is pruned (threshold None) unless the distribution really has two humps: the densities
    cross between the means, each component holds ≥ ``min_weight`` of the values, Ashman's D ≥
    ``min_separation``, the smoothed density between the means dips to ≤ ``max_valley`` of its height
    at them (two Gaussians split a flat or skewed single hump too, with D > 2) and, with ``log``, the
    component centres differ by a factor ≥ ``min_ratio`` (a stray low value in a small sample is no
    "negligible" population, which sparsity training puts decades lower). If every EM start
    degenerates, Otsu's split of the histogram stands in, accepted only when its effectiveness
    η ≥ ``min_otsu_eta`` and the same checks pass.
    """
    x = np.asarray(values.detach().cpu().double() if isinstance(values, torch.Tensor) else values, float).ravel()
    if log:
        x = np.abs(x)
        x = np.log10(np.maximum(x, x[x > 0].min() if (x > 0).any() else 1.0))
    samples = [float(v) for v in x]
    if x.size < 4 or np.ptp(x) == 0:
        return ThresholdFit(None, None, (1.0, 0.0), (float(x.mean()) if x.size else 0.0,) * 2, (0.0, 0.0), False,
                            "em", 0.0, 1.0, "fewer than 4 distinct values", log, samples)
    floor = max(1e-2 * float(x.std()), 1e-6)
    limits = (log, min_weight, min_separation, max_valley, min_ratio, min_otsu_eta)
    fitted = _em(x, floor)
    if fitted is not None:
        *two, bic2 = fitted
        fit = _judge(x, _crossing(*two), *two, "em", 1.0, *limits)
    else:
        t, eta = _otsu(x)
        sides = x[x < t], x[x >= t]
        two = (np.array([s.size / x.size for s in sides]), np.array([s.mean() for s in sides]),
               np.array([max(s.std(), 1e-9) for s in sides]))
        fit = _judge(x, t, *two, "otsu", eta, *limits)
    if fit.reason and fitted is not None and (many := _em_many(x, floor)) is not None and many[-1] < bic2:
        # Two Gaussians cannot place a skewed, long-tailed low population: split the mixture between two
        # neighbouring components, the negligible side holding everything below (weights merged), the cut
        # where the two neighbours cross; of the splits that pass every check, the best separated.
        wk, muk, sdk, _ = many
        splits = [_judge(x, _crossing(wk[k:k + 2], muk[k:k + 2], sdk[k:k + 2]),
                         np.array([wk[: k + 1].sum(), wk[k + 1:].sum()]), muk[k:k + 2], sdk[k:k + 2], "em-k", 1.0,
                         *limits) for k in range(len(wk) - 1)]
        fit = max((c for c in splits if not c.reason), key=lambda c: c.separation, default=fit)
    cut, w, mu, sd = fit.cut, fit.weights, fit.means, fit.stds
    threshold = None if fit.reason else (10 ** cut if log else cut)
    return ThresholdFit(None if threshold is None else float(threshold), None if fit.reason else float(cut),
                        (float(w[0]), float(w[1])), (float(mu[0]), float(mu[1])), (float(sd[0]), float(sd[1])),
                        not fit.reason, fit.method, fit.separation, fit.valley, fit.reason, log, samples)


class _Split(NamedTuple):
    """Two components (or a mixture split into two sides), the cut between them, and the first check failed."""

    cut: float | None
    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    method: str
    separation: float
    valley: float
    reason: str  # "" when every check passes


def _judge(x: np.ndarray, cut: float | None, w: np.ndarray, mu: np.ndarray, sd: np.ndarray, method: str, eta: float,
           log: bool, min_weight: float, min_separation: float, max_valley: float, min_ratio: float,
           min_otsu_eta: float) -> _Split:
    """A cut between two components, checked against ``learn_threshold``'s conditions."""
    separation = float(np.sqrt(2) * (mu[1] - mu[0]) / np.hypot(sd[0], sd[1]))
    valley = _valley(x, mu[0], mu[1])
    checks = [(cut is not None, "the component densities do not cross between the means"),
              (w.min() >= min_weight, f"a component holds < {min_weight:g} of the values"),
              (separation >= min_separation, f"components not separated (Ashman's D {separation:.2f} < "
                                              f"{min_separation:g})"),
              (valley <= max_valley, f"no density valley between the components ({valley:.2f} > {max_valley:g})"),
              (not log or 10 ** (mu[1] - mu[0]) >= min_ratio, f"component centres differ by less than {min_ratio:g}x"),
              (eta >= min_otsu_eta, f"Otsu split not clearly bimodal (η {eta:.2f} < {min_otsu_eta:g})")]
    reason = next((why for ok, why in checks if not ok), "")
    return _Split(cut, w, mu, sd, method, separation, valley, reason)
