"""What structured (channel-removing) methods share: the options that shape the PruneGraph, the BN-|γ|
sparsity regulariser of their ``sparsify`` stages, the cost a PruneResult records, and the score-and-remove
skeleton (``structured_prune``) of every method that is a criterion and a ranking."""

from __future__ import annotations

import torch
from torch import nn

from .. import criteria, thresholds
from ..errors import PrunekitError
from ..measure import count_params
from ..train import BNSparsity
from .registry import Context, Option, PruneResult

_LAYER_LIST = (list, tuple, type(None))
# Options every structured method takes (they shape the PruneGraph).
STRUCTURED_OPTIONS = (
    Option("ignored_layers", _LAYER_LIST, None, "module names (or modules) never pruned; the output layers never are"),
    Option("min_keep", int, 1, "channels every coupled group keeps at least", minimum=1),
    Option("round_to", (int, type(None)), None, "round kept channel counts up to a multiple of this (e.g. 8)",
           minimum=1),
)


# Sparsity training on BN scale factors (network slimming's L1 on γ), shared by the BN-|γ| methods.
DEFAULT_S = 2e-3
BN_SPARSITY_OPTIONS = (
    Option("s", (int, float), DEFAULT_S, "L1 strength on BN γ (sub-gradient s·sign(γ) added each step)", minimum=0),
    Option("decay", str, "constant", "how s falls over the stage", BNSparsity.DECAYS),
)


def prunable_bns(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: list | None = None) -> list[str]:
    """Names of the BNs of prunable coupled groups: the γ that decide what a BN-|γ| method removes."""
    from ..graph import PruneGraph

    x = example_inputs[:1].to(next(model.parameters()).device)
    return sorted({name for g in PruneGraph(model, x, ignored_layers=ignored_layers).groups for name in g.bns})


def bn_sparsity(model: nn.Module, settings: dict, total_steps: int, example_inputs: torch.Tensor,
                ignored_layers: list | None = None) -> BNSparsity:
    """The ``sparsify`` stage's regulariser for methods that rank channels by BN |γ|: only the BNs of prunable
    groups are penalised (shrinking a γ that can never be pruned only costs accuracy)."""
    return BNSparsity(s=settings["s"], decay=settings["decay"], total_steps=total_steps,
                      bns=prunable_bns(model, example_inputs, ignored_layers))


def cost(model: nn.Module, macs: int) -> dict[str, int]:
    """Params and MACs in the shape PruneResult records (MACs come from the graph's checked passes)."""
    return {"params": count_params(model), "macs": macs}


RANKING = Option("ranking", str, "local", "local: same ratio per layer; global: one normalised ranking",
                 ("local", "global"))
SEED = Option("seed", int, 0, "random generator seed (random criterion)", minimum=0, maximum=2 ** 32 - 1)


def structured_prune(model: nn.Module, ctx: Context, *, method: str, criterion: str,
                     speedup: float, ranking: str = "local", ignored_layers: list | None = None,
                     min_keep: int = 1, round_to: int | None = None, seed: int = 0,
                     percentile: float | None = None) -> PruneResult:
    """The skeleton every score-and-remove method shares: score → keep counts for the target → remove the
    lowest-scoring channels of each group (a method is then its criterion and its ranking)."""
    pg = ctx.graph(model, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
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
