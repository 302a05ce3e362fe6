"""Baselines that every seed method is compared against.

All five share one recipe: trace the coupled groups, score channels with a criterion, pick
how many to keep per group for the ``speedup`` target (uniform per-layer ratio for the
norm-based rules as in Li et al. 2017 and FPGM; one global threshold on raw |γ| for network
slimming, Liu et al. 2017), and physically remove the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import criteria, thresholds
from ..errors import PrunekitError
from ..graph import PruneGraph
from . import BN_SPARSITY_OPTIONS, STRUCTURED_OPTIONS, Context, Option, PruneResult, bn_sparsity, cost, register

RANKING = Option("ranking", str, "local", "local: same ratio per layer; global: one normalised ranking",
                 ("local", "global"))
SEED = Option("seed", int, 0, "random generator seed (random criterion)", minimum=0, maximum=2 ** 32 - 1)


def structured_prune(model: nn.Module, example_inputs: torch.Tensor, *, method: str, criterion: str,
                     speedup: float, ranking: str = "local", ignored_layers: list | None = None,
                     min_keep: int = 1, round_to: int | None = None, seed: int = 0,
                     percentile: float | None = None) -> PruneResult:
    """Score → keep counts for the target → remove the lowest-scoring channels of each group."""
    pg = PruneGraph(model, example_inputs, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
    before = cost(model, pg.base_macs)
    gen = torch.Generator().manual_seed(seed)
    scores = {g.index: s for g in pg.groups if (s := criteria.scores(g, criterion, gen)) is not None}
    if not scores:
        raise PrunekitError(f"{method}: no prunable channel group has a {criterion} score (for net-slim: no "
                            "BatchNorm follows a prunable layer)")
    if ranking == "local":
        keep = {gi: k for gi, k in thresholds.local_keep_for_speedup(pg, speedup).items() if gi in scores}
    else:
        ranked = scores if criterion == "net-slim" else thresholds.normalise(scores)
        if percentile is not None:
            keep = thresholds.percentile_keep(pg, ranked, percentile)
        else:
            keep = thresholds.global_keep_for_speedup(pg, ranked, speedup)
    remove = {gi: thresholds.lowest(scores[gi], k, pg.groups[gi].chunks) for gi, k in keep.items()}
    channels = {pg.groups[gi].name: (pg.groups[gi].size, keep[gi]) for gi in keep}
    removed = {pg.groups[gi].name: idx for gi, idx in remove.items()}
    info = {}
    if criterion == "net-slim":  # for the report's |γ| histogram with the global threshold
        gammas = torch.cat(list(scores.values())).clamp_min(1e-12)
        cut = [float(scores[gi][i]) for gi, idx in remove.items() for i in idx]
        info = {"gamma_log10": gammas.log10().tolist(),
                "threshold_log10": float(torch.tensor(max(cut)).clamp_min(1e-12).log10()) if cut else None}
    after = cost(model, pg.apply(remove))
    return PruneResult(model, method, {"speedup": speedup, "ranking": ranking}, before, after, channels, removed,
                       info=info)


def _net_slim_figures(info: dict) -> list[tuple[str, bytes]]:
    from ..plots import threshold_histogram  # matplotlib only when a report is drawn

    if "gamma_log10" not in info:
        return []
    return [("gamma", threshold_histogram(info["gamma_log10"], info.get("threshold_log10"),
                                          "log10 |γ| (all prunable channels)"))]


def _baseline(name: str, criterion: str, ranking: str, summary: str, *extra: Option, **declared: Any) -> None:
    @register(name, summary, options=(*STRUCTURED_OPTIONS, replace(RANKING, default=ranking),
                                      *extra), **declared)
    def run(model: nn.Module, ctx: Context, *, speedup: float | None, **opts: Any) -> PruneResult:
        return structured_prune(model, ctx.example_inputs, method=name, criterion=criterion,
                                speedup=speedup or 1.0, **opts)


_baseline("l1-norm", "l1-norm", "local", "smallest group L1-norm filters removed, same ratio per layer (Li 2017)")
_baseline("l2-norm", "l2-norm", "local", "smallest group L2-norm filters removed, same ratio per layer")
_baseline("fpgm", "fpgm", "local", "filters nearest the geometric median removed (He 2019)")
_baseline("net-slim", "net-slim", "global",
          "BN scale |γ| below one global threshold removed (Liu 2017); percentile= or speedup=",
          Option("percentile", (int, float, type(None)), None, "remove channels below this global |γ| percentile "
                 "(0-100) instead of reaching speedup", minimum=0, maximum=100),
          regularizer=bn_sparsity, regularizer_options=BN_SPARSITY_OPTIONS, figures=_net_slim_figures,
          needs_batchnorm=True, own_cut=lambda o: "percentile" if o["percentile"] is not None else None)
_baseline("random", "random", "local", "random filters removed, same ratio per layer (sanity baseline)", SEED)
