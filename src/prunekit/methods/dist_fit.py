"""S1 dist-fit: filter pruning via norm-distribution fitting.

Zhang, Kou & Liu (Computer Technology and Development 32(12), 2022) observe that removing the
smallest-norm filters skews each layer's filter-norm distribution, and keep instead a set of
filters that *fits* the original distribution, deleting redundant filters; they report
ResNet-110 on CIFAR-10 with > 62 % fewer FLOPs at −0.14 % relative accuracy.

Steps, as in the paper (our reading, SPEC §4 S1):
1. per coupled group, the group L1 norm of each filter (all coupled members combined, as `l1-norm`);
2. per-layer keep counts k from the global ``speedup`` target (same ratio per layer);
3. keep the filters at the quantiles (j + 0.5) / k of the sorted norms (minimum 1-D Wasserstein
   distance to the original distribution), breaking near-ties by deleting the filter most
   cosine-similar to a kept one (redundancy);
4. physically remove the others.
"""

from __future__ import annotations

from torch import nn

from .. import criteria, thresholds
from . import STRUCTURED_OPTIONS, Context, Option, PruneResult, cost, register


def _figures(info: dict) -> list[tuple[str, bytes]]:
    """One layer's norm histogram: what dist-fit keeps against what l1-norm (largest norms) would keep."""
    from ..plots import kept_histograms  # matplotlib only when a report is drawn

    norms = info.get("norms")
    if not norms:
        return []
    name = max(norms, key=lambda n: len(norms[n]["norms"]) - len(norms[n]["kept"]))
    values, kept = norms[name]["norms"], norms[name]["kept"]
    k = len(kept)
    return [("norms", kept_histograms(name, values, [(f"dist-fit keeps {k}", [values[i] for i in kept]),
                                                      (f"l1-norm keeps {k}", sorted(values)[-k:])]))]


@register("dist-fit", "S1: keep filters whose norms fit the original norm distribution (quantile picks)",
          figures=_figures,
          options=(*STRUCTURED_OPTIONS,
                   Option("tol", (int, float), 0.1, "redundancy tie-break window, in standard deviations of norm",
                          minimum=0)))
def dist_fit(model: nn.Module, ctx: Context, *, speedup: float | None, ignored_layers: list | None,
             min_keep: int, round_to: int | None, tol: float) -> PruneResult:
    pg = ctx.graph(model, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
    before = cost(model, pg.base_macs)
    keep = thresholds.local_keep_for_speedup(pg, speedup or 1.0)
    remove: dict[int, list[int]] = {}
    norms_log: dict[str, dict[str, list[float]]] = {}
    for g in pg.groups:
        norms = criteria.scores(g, "l1-norm")
        if g.chunks > 1:  # grouped convs need the same positions in every block: smallest-norm rule there
            remove[g.index] = thresholds.lowest(norms, keep[g.index], g.chunks)
            kept = sorted(set(range(g.size)) - set(remove[g.index]))
        else:
            kept = criteria.distribution_fit_keep(norms, keep[g.index], criteria.root_filters(g), tol=tol)
            remove[g.index] = sorted(set(range(g.size)) - set(kept))
        norms_log[g.name] = {"norms": norms.tolist(), "kept": kept}
    channels = {g.name: (g.size, keep[g.index]) for g in pg.groups}
    removed = {pg.groups[gi].name: idx for gi, idx in remove.items()}
    after = cost(model, pg.apply(remove))
    return PruneResult(model, "dist-fit", {"speedup": speedup}, before, after, channels, removed,
                       info={"norms": norms_log})
