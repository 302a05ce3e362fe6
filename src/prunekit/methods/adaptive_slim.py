"""S0 adaptive-slim: adaptive-threshold recurrent pruning of channels and residual blocks.

Wang Yizhong et al. (Application Research of Computers 39(5), 2022) compress YOLOv3 by base
training → sparsity training → adaptive-threshold pruning → fine-tuning, with the prune step
repeated and applied to channels and to whole layers (residual blocks). Against network
slimming (``net-slim``: one hand-set global percentile of BN |γ|) they argue that the threshold
should be learned from the current distribution of the BN scale factors. Our reading (SPEC §4 S0):

1. Sparsity training (``sparsify`` with ``BNSparsity``): the L1 penalty s·Σ|γ| on BN scale
   factors, applied as its sub-gradient s·sign(γ) added to γ's gradient after backward, with s
   constant or decayed (linear / cosine). It drives the γ of unneeded channels towards zero until
   log10|γ| splits into a "negligible" and an "important" population.
2. Adaptive threshold (``thresholds.learn_threshold``): a two-Gaussian mixture fitted by EM to
   log10|γ| of all prunable channels; the cut is where the two weighted component densities cross.
   While the distribution is still single-humped nothing is pruned this round.
3. Layer pruning (``prune_blocks``): each residual block is scored by the mean |γ| of the BN that
   closes it; the same learner over the block scores picks the blocks replaced by identity.
4. Channel pruning (``adaptive_slim``): |γ| per coupled group with mask union (a channel survives
   if any of its BNs is above the cut); per group the largest-|γ| channel and ``min_keep`` channels
   always stay; β compensation (``compensate_beta``), then physical removal.
5. Fine-tune, and repeat 1–4 (the pipeline's ``cycle`` stage) until a round removes < 1 % of the
   MACs or the validation metric drops by more than the tolerance.

Defaults, from CPU-protocol runs on ResNet-20 (base 85.6 % top-1, SGD lr 0.02 constant):
s = 2e-3 leaves log10|γ| single-humped after 1–2 epochs and shows a thin low mode (≈3 % of
channels below 10^-1.6) after 3; s = 1e-2 is clearly bimodal after one epoch (≈17 % of channels
below 10^-2.1, 33 % after two) but top-1 falls to 63 % / 44 % while sparsifying. Hence
``DEFAULT_S = 2e-3``, constant, for at least 3 epochs per round (the SPEC's 1e-4…1e-3 suits the
paper's long schedules; on short ones a smaller s would not separate in time); take s = 1e-2
only with a fine-tune long enough to recover. The learner accepts a low component holding ≥ 1 %
of the channels (``min_weight``) so that the thin early mode already counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import criteria, thresholds
from ..blocks import find_blocks, remove_block
from ..graph import IN_CHANNEL_FNS, PruneGraph, set_module
from ..measure import hooked, layer_macs
from ..thresholds import ThresholdFit, learn_threshold
from ..train import TrainConfig, TrainResult, fit
from . import (
    BN_SPARSITY_OPTIONS,
    DEFAULT_S,
    STRUCTURED_OPTIONS,
    Context,
    Option,
    PruneResult,
    bn_sparsity,
    cost,
    register,
)


# ---- 1. sparsity training: train.BNSparsity, the L1 sub-gradient s·sign(γ) on BN scale factors ----
def sparsify(model: nn.Module, train_loader, val_loader, cfg: TrainConfig, s: float = DEFAULT_S, *,
             example_inputs: torch.Tensor, decay: str = "constant", ignored_layers: list | None = None,
             **fit_kwargs: Any) -> tuple[nn.Module, TrainResult]:
    """Step 1, sparsity training: ``train.fit`` with the L1 sub-gradient on the γ of prunable groups' BNs,
    the same regulariser a pipeline's ``sparsify`` stage uses (``methods.bn_sparsity``).

    ``fit_kwargs`` go to ``fit`` (device, run_dir, resume, ...); on resume a decaying s restarts its schedule.
    """
    hook = bn_sparsity(model, {"s": s, "decay": decay}, max(1, cfg.epochs * len(train_loader)), example_inputs,
                       ignored_layers)
    fit_kwargs.setdefault("desc", "sparsify")
    return fit(model, train_loader, val_loader, cfg, after_backward=hook, **fit_kwargs)


# ---- 3. layer pruning ----
def prune_blocks(model: nn.Module, example_inputs: torch.Tensor, *, protected: Sequence[nn.Module] = (),
                 speedup: float | None = None,
                 **learner: Any) -> tuple[list[str], dict[str, float], ThresholdFit | None]:
    """Replace by identity the residual blocks whose closing-BN mean |γ| the learner finds negligible.

    Returns (removed block names, every block's score, the fit over the scores). Blocks holding a
    ``protected`` module stay; with ``speedup`` blocks go lowest score first while the MACs ratio stays
    within it. Identity is exact for a block whose closing BN has γ = β = 0; the β of a removed block
    is not compensated (fine-tuning absorbs it).
    """
    blocks = [b for b in find_blocks(model, example_inputs)
              if not any(m in protected for m in model.get_submodule(b.name).modules())]
    scores = {b.name: float(model.get_submodule(b.closing_bn).weight.detach().abs().mean()) for b in blocks}
    fitted = learn_threshold(list(scores.values()), **learner) if scores else None
    if fitted is None or fitted.threshold is None:
        return [], scores, fitted
    def macs() -> int:
        return sum(layer_macs(model, example_inputs[:1])[1].values())

    base = macs() if speedup else 0
    removed: list[str] = []
    for b in sorted(blocks, key=lambda b: scores[b.name]):
        if scores[b.name] >= fitted.threshold:
            break
        block = model.get_submodule(b.name)
        remove_block(model, b)
        if speedup and base / max(macs(), 1) > speedup:
            set_module(model, b.name, block)
            break
        removed.append(b.name)
    return removed, scores, fitted


# ---- 4. β compensation ----
@torch.no_grad()
def compensate_beta(pg: PruneGraph, remove: dict[int, list[int]]) -> list[str]:
    """Fold what the channels about to be removed still emit into their consumers; return those left out.

    With γ = 0 a BN emits its β, so a removed channel still fed the constant act(β) (along a residual
    stream: a ReLU'd sum of such constants) to every layer reading it. Rather than assume the path
    (ReLU, ReLU6, pooling and residual sums all occur), one eval forward with the removed γ zeroed
    records each consumer's input on those channels; each one that is constant is folded into the
    consumer's bias, the BN right after it (running mean), or, for a bias-less branch of an add such
    as the option-A shortcut, the BN on the other side of the add (β). A channel whose input is not
    constant cannot be folded: e.g. a residual channel that still carries an unpruned channel through
    a shortcut; its consumer's name is returned. Depthwise consumers need nothing (their output
    channel goes too). 1×1 and linear consumers are then exact; a zero-padded k×k consumer sees the
    constant only partly on its border ring, which no per-channel bias can reproduce, so there the
    fold is exact everywhere except that ring. Call right before ``pg.apply(remove)``: the removed γ
    stay zeroed.
    """
    taps: dict[nn.Module, set[int]] = {}
    for gi, idxs in remove.items():
        for mod, handler, i in pg.member_indices(gi, idxs):
            if isinstance(mod, _BatchNorm) and mod.weight is not None:
                mod.weight[i] = 0
            elif handler in IN_CHANNEL_FNS:
                taps.setdefault(mod, set()).update(i)
    chans = {m: sorted(i) for m, i in taps.items()}
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in chans}

    def record(m: nn.Module, inp: tuple, _out: Any) -> None:
        seen[m].append(inp[0][:, chans[m]].transpose(0, 1).reshape(len(chans[m]), -1))

    x = pg.example_inputs  # plus a noise image: a value constant over 2+ inputs does not depend on the input
    noise = torch.randn(x[:1].shape, generator=torch.Generator(x.device).manual_seed(0), device=x.device)
    probe = torch.cat([x, noise.to(x.dtype) * x.std() + x.mean()])
    with hooked(pg.model, [(m, record) for m in chans]):
        pg.model(probe)
    left = []
    for m, idx in chans.items():
        if getattr(m, "groups", 1) > 1:
            if m.groups != m.in_channels:  # a grouped, not depthwise, conv keeps its output channels
                left.append(pg.names[m])
            continue
        vals = torch.cat(seen[m], 1)
        const = (vals.amax(1) - vals.amin(1)) <= 1e-6 * (1 + vals.abs().amax(1))
        ok = [c for c, k in zip(idx, const.tolist(), strict=True) if k]
        folded = not ok or pg.fold_constant(m, ok, vals[const, 0])
        if not (folded and const.all()):
            left.append(pg.names[m])
    return left


# ---- one round: learn thresholds, remove blocks, remove channels ----
def _capped(pg: PruneGraph, scores: dict[int, torch.Tensor], keep: dict[int, int], cap: float) -> dict[int, int]:
    """The most of the removals in ``keep``, lowest |γ| first across groups, whose MACs ratio stays ≤ ``cap``."""
    order = sorted((float(scores[gi][c]), gi) for gi, k in keep.items()
                   for c in thresholds.lowest(scores[gi], k, pg.groups[gi].chunks))

    def keep_at(n: int) -> dict[int, int]:
        gone = Counter(gi for _, gi in order[:n])
        return {gi: pg.clamp_keep(pg.groups[gi], len(s) - gone[gi]) for gi, s in scores.items()}

    lo, hi = 0, len(order)
    while lo < hi:  # bisection on how many of the ranked removals to make
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pg.base_macs / max(pg.macs(keep_at(mid)), 1) <= cap else (lo, mid - 1)
    return keep_at(lo)


def _figures(info: dict) -> list[tuple[str, bytes]]:
    from ..plots import threshold_histogram  # matplotlib only when a report is drawn

    fit = info.get("channel_fit")
    if not fit or not fit.get("samples"):
        return []
    comps = (fit["weights"], fit["means"], fit["stds"])
    return [("gamma", threshold_histogram(fit["samples"], fit["cut"], "log10 |γ| (all prunable channels)", comps))]


LEARNER_OPTIONS = (
    Option("min_weight", (int, float), 0.01, "learner: least share of values in the negligible component",
           minimum=0, maximum=1),
    Option("min_separation", (int, float), 2.0, "learner: least Ashman's D between the two components", minimum=0),
    Option("max_valley", (int, float), 0.5, "learner: highest density dip between the modes (1 = none)",
           minimum=0, maximum=1),
    Option("min_ratio", (int, float), 3.0, "learner: least factor between the component centres", minimum=1),
)


@register("adaptive-slim", "S0: channels and residual blocks below a BN-|γ| threshold learned by EM; one round",
          kind="adaptive", regularizer=bn_sparsity, regularizer_options=BN_SPARSITY_OPTIONS, figures=_figures,
          needs_batchnorm=True,
          options=(*STRUCTURED_OPTIONS,
                   Option("layers", bool, True, "also replace negligible residual blocks by identity"),
                   Option("channels", bool, True, "prune channels below the learned threshold"),
                   Option("compensate", bool, True, "fold removed channels' constant output (β) into consumers"),
                   *LEARNER_OPTIONS))
def adaptive_slim(model: nn.Module, ctx: Context, *, speedup: float | None, ignored_layers: list | None,
                  min_keep: int, round_to: int | None, layers: bool, channels: bool, compensate: bool,
                  min_weight: float, min_separation: float, max_valley: float, min_ratio: float) -> PruneResult:
    """One prune round (steps 2–4); ``speedup``, if given, caps how much it removes.

    ``info`` holds what the report plots: both threshold fits (with the log10 scores behind them),
    block scores, channels removed per group, blocks removed, the MACs fraction removed, and the
    consumers whose β compensation was impossible.
    """
    learner = {"min_weight": min_weight, "min_separation": min_separation, "max_valley": max_valley,
               "min_ratio": min_ratio}
    opts = {"ignored_layers": ignored_layers, "min_keep": min_keep, "round_to": round_to}
    example_inputs = ctx.example_inputs
    pg = PruneGraph(model, example_inputs, **opts)
    before = cost(model, pg.base_macs)
    blocks_removed, block_scores, block_fit = [], {}, None
    if layers:
        blocks_removed, block_scores, block_fit = prune_blocks(model, example_inputs, protected=pg.ignored,
                                                               speedup=speedup, **learner)
        if blocks_removed:
            pg = PruneGraph(model, example_inputs, **opts)
    scores = {g.index: s for g in pg.groups if (s := criteria.bn_gamma(model, g)) is not None} if channels else {}
    channel_fit = learn_threshold(torch.cat(list(scores.values())), **learner) if scores else None
    keep = {gi: len(s) for gi, s in scores.items()}
    if channel_fit is not None and channel_fit.threshold is not None:
        keep = thresholds.threshold_keep(pg, scores, channel_fit.threshold)  # min_keep: the max |γ| survives
        if speedup:  # what the removed blocks already saved counts against the cap
            keep = _capped(pg, scores, keep, speedup * pg.base_macs / before["macs"])
    remove = {gi: sorted(thresholds.lowest(scores[gi], k, pg.groups[gi].chunks)) for gi, k in keep.items()
              if k < len(scores[gi])}
    uncompensated = compensate_beta(pg, remove) if compensate and remove else []
    after = cost(model, pg.apply(remove))
    info = {
        "threshold": channel_fit.threshold if channel_fit else None,
        "channel_fit": channel_fit.to_dict() if channel_fit else None,
        "block_fit": block_fit.to_dict() if block_fit else None,
        "block_scores": block_scores,
        "channels_removed": {pg.groups[gi].name: len(idx) for gi, idx in remove.items()},
        "blocks_removed": blocks_removed,
        "macs_removed": 1 - after["macs"] / max(before["macs"], 1),
        "uncompensated": uncompensated if compensate else None,
    }
    return PruneResult(model, "adaptive-slim", {"speedup": speedup}, before, after,
                       {pg.groups[gi].name: (len(s), keep[gi]) for gi, s in scores.items()},
                       {pg.groups[gi].name: idx for gi, idx in remove.items()}, blocks_removed, info)
