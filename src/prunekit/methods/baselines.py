"""Baselines that every seed method is compared against.

All five share one recipe: trace the coupled groups, score channels with a criterion, pick
how many to keep per group for the ``speedup`` target (uniform per-layer ratio for the
norm-based rules as in Li et al. 2017 and FPGM; one global threshold on raw |γ| for network
slimming, Liu et al. 2017), and physically remove the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from . import BN_SPARSITY_OPTIONS, STRUCTURED_OPTIONS, Context, Option, PruneResult, bn_sparsity, register
from .structured import RANKING, SEED, structured_prune


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
        return structured_prune(model, ctx, method=name, criterion=criterion,
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
