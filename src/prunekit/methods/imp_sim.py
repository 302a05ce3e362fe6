"""S3 imp-sim: prune unimportant channels, then merge linearly similar ones with weight compensation.

Zhang Qirong, Han Zhong & Wang Biao (J. Chongqing Univ. Posts & Telecom. 36(3), 2024) compress
YOLO in two stages after sparsity training: remove the channels whose BN scale factor marks them
unimportant, then find channels whose feature maps are a linear function of another channel's,
let the partner stand in for them, and remove them too; then fine-tune. Plain pruning throws a
removed channel's output away; a merged channel's output is rebuilt from its partner, so the
network loses far less before fine-tuning (Neuron Merging, Kim et al. 2020, makes the same case).

Steps, as in the paper (our reading, SPEC §4 S3):
1. sparsity training: L1 on BN γ (``bn_sparsity``, a pipeline ``sparsify`` stage);
2. stage 1, importance: BN |γ| ranked globally (network slimming) removes the lowest channels
   until ``stage1_share`` of the MACs reduction is met (1 = net-slim alone);
3. stage 2, similarity: calibration batches of the training split run through the net. For every
   coupled group the input of every layer that reads it is recorded: post-activation, as that
   layer sees it. For each pair x_j ≈ a·x_i + b is fitted by least squares and scored by R²
   (= Pearson r²). A residual- or concat-coupled channel reaches several such layers through
   different sums and activations; the pair counts only if R² > ``tau`` at every one of them,
   each with its own (a, b) (τ = 1 merges nothing). Greedy, highest R² first: the partner i is
   kept, each removed j has one partner, no chains (a removed channel is never a partner, a
   partner is never removed), until the MACs target is met;
4. merge: remove j and fold it into every reading layer, W[:, i] += a·W[:, j] and the constant
   b·ΣW[:, j] into that layer's bias, the BN right after it (running mean) or, for a bias-less
   branch of an add such as the option-A shortcut, the BN across the add. Exact for 1×1 and linear
   consumers; a zero-padded k×k consumer differs on its border ring only, where x_j was padded
   with 0 but the folded constant is not;
5. fine-tune (the pipeline's next stage).

A group read by a depthwise or grouped conv cannot merge (its input channel j has no other input
to move to) and is left to stage 1; stage 2 removes single channels, so it does not take
``round_to``.

``stage1_share: auto`` (the default) replaces the fixed split by what each removal costs (issue 24).
For every channel j of a group that can merge, and every layer m reading it, the calibration batches
give j's variance v_mj at m's input and m's weights on it, w_mj = ‖W_m[:, j]‖²; then
- *remove* j (its mean folded into the readers): cost Σ_m v_mj·w_mj, the expected squared error it
  adds to the readers' outputs;
- *merge* j into partner i (x_j ≈ a·x_i + b folded as in 4.): cost Σ_m (1 − R²_m[j, i])·v_mj·w_mj.
The cheapest action per MAC saved is taken greedily (lazily re-scored: a partner taken away, a MACs
saving that changed) until the target; a removed channel is never a partner and a partner is never
removed. After sparsity training the low-|γ| channels are near constant, so they go first at almost
no cost, as stage 1 takes them. ``tau`` is then an optional floor on R² (default none). The error of
the choice (the sum of its costs) is compared with stage 1 alone's channels at the same target,
removed the same way; if the greedy loses, or cannot reach the target (partners locked, groups it
cannot measure left whole), stage 1's channels are taken: never worse than stage 1, and every target
stage 1 reaches is reached.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch
from torch import nn

from .. import criteria, thresholds
from ..errors import PrunekitError
from ..graph import PruneGraph
from . import BN_SPARSITY_OPTIONS, STRUCTURED_OPTIONS, Context, Option, PruneResult, bn_sparsity, cost, register
from ._merge import Moments, merge, pair_scores, readers, similarity


# ---- 2. stage 1: BN |γ|, one global ranking ----
def stage1_speedup(speedup: float, share: float) -> float:
    """The speedup after stage 1 when it takes ``share`` of the MACs reduction that ``speedup`` asks for."""
    return 1.0 / (1.0 - share * (1.0 - 1.0 / speedup))


# ---- 3. stage 2: linear similarity at every reading layer (its maths: ``_merge``) ----
def greedy_pairs(pg: PruneGraph, r2: dict[int, torch.Tensor], importance: dict[int, torch.Tensor],
                 keep: dict[int, int], gone: dict[int, set[int]], tau: float, target_macs: int,
                 ceiling_macs: float) -> list[tuple[int, int, int, float]]:
    """(group, removed j, partner i, R²) by highest R² first, under the pairing rules, until ``target_macs``.

    Ties go to removing the less important channel (lower |γ|) into the more important partner, so that a
    constant channel, which any partner fits, never blocks another one from going by being its partner.
    ``keep`` is updated in place; a pair that would take the MACs below ``ceiling_macs`` (beyond the
    target's tolerance) is passed over.
    """
    cands = []
    for gi, s in r2.items():
        s = s.clone()
        s[list(gone[gi])] = 0  # stage 1 removed these rows and columns
        s[:, list(gone[gi])] = 0
        jj, ii = (s > tau).nonzero(as_tuple=True)
        imp = importance[gi]
        cands += zip((-s[jj, ii]).tolist(), imp[jj].tolist(), (-imp[ii]).tolist(), [gi] * len(jj), jj.tolist(),
                     ii.tolist(), strict=True)
    cands.sort()
    removed: dict[int, set[int]] = {gi: set() for gi in r2}
    partners: dict[int, set[int]] = {gi: set() for gi in r2}
    merges: list[tuple[int, int, int, float]] = []
    macs = pg.macs(keep)
    for neg_r2, _, _, gi, j, i in cands:
        if macs <= target_macs:
            break
        if j in removed[gi] or j in partners[gi] or i in removed[gi] or keep[gi] - 1 < pg.min_keep:
            continue
        keep[gi] -= 1
        if pg.macs(keep) < ceiling_macs:
            keep[gi] += 1
            continue
        macs = pg.macs(keep)
        removed[gi].add(j)
        partners[gi].add(i)
        merges.append((gi, j, i, -neg_r2))
    return merges


# ---- 4. merge with compensation (``_merge.merge``) ----
@torch.no_grad()
def stage2(model: nn.Module, pg: PruneGraph, batches: list, stage1: dict[int, list[int]],
           gamma: dict[int, torch.Tensor], keep: dict[int, int], speedup: float,
           tau: float) -> tuple[list[tuple[int, int, int, float]], list[float]]:
    """Measure the net as stage 1 leaves it (masked), pick the pairs and merge them; ``keep`` is updated.

    Returns the merges (group, removed j, partner i, R²) and every remaining channel's best R².
    """
    pg.zero_channels(stage1)
    views = {g.index: v for g in pg.groups if (v := readers(pg, g.index)) is not None}
    fits = {gi: {m: mom.fit() for m, mom in ms.items()} for gi, ms in similarity(model, views, batches).items()}
    r2 = {gi: pair_scores(f) for gi, f in fits.items()}
    gone = {gi: set(stage1.get(gi, [])) for gi in r2}
    importance = {gi: gamma.get(gi, torch.zeros(len(s))) for gi, s in r2.items()}
    merges = greedy_pairs(pg, r2, importance, keep, gone, tau, int(pg.base_macs / speedup),
                          pg.base_macs / (speedup * (1 + thresholds.TOLERANCE)))
    reached = pg.base_macs / max(pg.macs(keep), 1)
    if reached < speedup * (1 - thresholds.TOLERANCE):
        raise PrunekitError(f"imp-sim: speedup {speedup:g} is out of reach with tau={tau:g}: stage 1 and every pair "
                            f"with R² > tau reach {reached:.2f}x; lower tau, raise stage1_share or lower the target")
    for gi, j, i, _ in merges:
        merge(pg, views[gi], fits[gi], j, i)
    best = [float(r2[gi][c].max()) for gi in r2 for c in range(len(r2[gi])) if c not in gone[gi]]
    return merges, best


# ---- auto: every removal decided by what it costs ----
@torch.no_grad()
def action_costs(views: dict[int, dict[nn.Module, torch.Tensor]],
                 moments: dict[int, dict[nn.Module, Moments]]) -> dict[int, dict[str, Any]]:
    """Per group: the cost of removing each channel (C,), of merging j into i (C, C), the lowest R² over
    the readers, and each reader's fit and channel means (what the compensation folds)."""
    out = {}
    for gi, ms in moments.items():
        remove, merge_cost, r2_min, fits, means = 0.0, 0.0, None, {}, {}
        for m, mom in ms.items():
            r2, a, b = mom.fit()
            mu, var = mom.mean_var()
            w2 = m.weight.detach().double().pow(2)
            per_input = w2.sum(0).flatten(1).sum(1) if w2.dim() > 2 else w2.sum(0)  # ‖W[:, c]‖² per input
            c = var * per_input[views[gi][m]].sum(1)
            remove = remove + c
            cost = (1 - r2.double()) * c[:, None]
            cost[(a == 0).all(1)] = math.inf  # a constant channel is fitted by b alone: that is a removal
            merge_cost = merge_cost + cost
            r2_min = r2 if r2_min is None else torch.minimum(r2_min, r2)
            fits[m], means[m] = (r2, a, b), mu.float()
        out[gi] = {"remove": remove, "merge": merge_cost, "r2": r2_min, "fits": fits, "means": means}
    return out


def cheapest(pg: PruneGraph, costs: dict[int, dict[str, Any]], importance: dict[int, torch.Tensor],
             keep: dict[int, int], tau: float, target_macs: int,
             ceiling_macs: float) -> list[tuple[int, int, int | None, float]] | None:
    """(group, channel, partner or None for a removal, cost): the cheapest action per MAC saved, greedily,
    until ``target_macs``; None if the target cannot be reached this way. ``keep`` is updated in place."""
    removed = {gi: set() for gi in costs}
    partners = {gi: set() for gi in costs}
    macs = pg.macs(keep)

    def best(gi: int, j: int) -> tuple[float, int | None]:
        c = costs[gi]
        merge_cost = c["merge"][j].clone()
        merge_cost[list(removed[gi] | {j})] = math.inf  # a removed channel is never a partner
        if tau > 0:
            merge_cost[c["r2"][j] <= tau] = math.inf
        i = int(torch.argmin(merge_cost))
        return (float(merge_cost[i]), i) if merge_cost[i] < c["remove"][j] else (float(c["remove"][j]), None)

    def saving(gi: int) -> int:
        keep[gi] -= 1
        d = macs - pg.macs(keep)
        keep[gi] += 1
        return d

    heap = []
    for gi in costs:
        d = saving(gi) if keep[gi] > pg.min_keep else 0
        for j in range(len(costs[gi]["remove"])):
            heap.append((best(gi, j)[0] / max(d, 1), float(importance[gi][j]), gi, j))
    heapq.heapify(heap)
    actions = []
    while macs > target_macs and heap:
        _, imp, gi, j = heapq.heappop(heap)
        if j in removed[gi] or j in partners[gi] or keep[gi] - 1 < pg.min_keep:
            continue
        cost, partner = best(gi, j)
        d = saving(gi)
        if d <= 0:
            continue
        key = cost / d
        if heap and key > heap[0][0]:  # its cost or saving changed since it was queued: re-queue (lazy greedy)
            heapq.heappush(heap, (key, imp, gi, j))
            continue
        keep[gi] -= 1
        now = pg.macs(keep)
        if now < ceiling_macs:  # would land below the target's tolerance: pass over
            keep[gi] += 1
            continue
        macs = now
        removed[gi].add(j)
        if partner is not None:
            partners[gi].add(partner)
        actions.append((gi, j, partner, cost))
    return actions if macs <= target_macs else None


@torch.no_grad()
def apply_actions(pg: PruneGraph, views: dict[int, dict[nn.Module, torch.Tensor]], costs: dict[int, dict[str, Any]],
                  actions: list[tuple[int, int, int | None, float]]) -> None:
    """Fold every action into the readers before the channels go: a merge as in 4., a removal's mean."""
    for gi, j, i, _ in actions:
        if gi not in views:
            continue
        if i is not None:
            merge(pg, views[gi], costs[gi]["fits"], j, i)
        else:
            for m, idx in views[gi].items():
                pg.fold_constant(m, idx[j].tolist(), costs[gi]["means"][m][j].expand(idx.shape[1]).clone())


def auto(model: nn.Module, pg: PruneGraph, batches: list, gamma: dict[int, torch.Tensor], speedup: float,
         tau: float) -> tuple[dict[int, list[int]], dict[int, int], dict[str, Any]]:
    """The cost-driven choice (or stage 1's, where that costs less or the greedy cannot reach the target),
    folded into the model; returns (channels to remove per group, keep counts, info)."""
    views = {g.index: v for g in pg.groups if (v := readers(pg, g.index)) is not None}
    costs = action_costs(views, similarity(model, views, batches))
    importance = {gi: gamma.get(gi, torch.zeros(len(c["remove"]))) for gi, c in costs.items()}
    full = {g.index: g.size for g in pg.groups}
    keep = dict(full)
    target, ceiling = int(pg.base_macs / speedup), pg.base_macs / (speedup * (1 + thresholds.TOLERANCE))
    actions = cheapest(pg, costs, importance, keep, tau, target, ceiling)
    keep1 = full | thresholds.global_keep_for_speedup(pg, gamma, speedup)
    stage1 = {gi: thresholds.lowest(gamma[gi], k, pg.groups[gi].chunks) for gi, k in keep1.items() if gi in gamma}
    stage1_actions = [(gi, j, None, float(costs[gi]["remove"][j]) if gi in costs else 0.0)
                      for gi, idx in stage1.items() for j in idx]
    error = None if actions is None else sum(a[3] for a in actions)
    stage1_error = sum(a[3] for a in stage1_actions)
    chosen = "cost" if actions is not None and error <= stage1_error else "stage 1"
    if chosen == "stage 1":
        actions, keep = stage1_actions, keep1
    apply_actions(pg, views, costs, actions)
    remove: dict[int, list[int]] = {}
    for gi, j, _, _ in actions:
        remove.setdefault(gi, []).append(j)
    per_group = {}
    for gi, _, i, err in actions:
        row = per_group.setdefault(pg.groups[gi].name, {"removed": 0, "merged": 0, "cost_removed": 0.0,
                                                        "cost_merged": 0.0})
        kind = "merged" if i is not None else "removed"
        row[kind] += 1
        row[f"cost_{kind}"] += err
    info = {"chosen": chosen, "error": sum(a[3] for a in actions), "stage1_error": stage1_error,
            "cost_error": error, "groups": per_group,
            "pairs": [{"group": pg.groups[gi].name, "removed": j, "partner": i, "cost": c}
                      for gi, j, i, c in actions if i is not None]}
    return {gi: sorted(v) for gi, v in remove.items()}, keep, info


def _figures(info: dict) -> list[tuple[str, bytes]]:
    from ..plots import actions_per_group, threshold_histogram  # matplotlib only when a report is drawn

    if info.get("groups"):
        return [("actions", actions_per_group(info["groups"]))]
    if not info.get("similarity"):
        return []
    return [("similarity", threshold_histogram(info["similarity"], info["tau"],
                                               "each channel's best R² (lowest over its reading layers)",
                                               xlabel="R² of x_j ≈ a·x_i + b with its best partner"))]


@register("imp-sim", "S3: BN-|γ| pruning, then linearly similar channels merged into a partner with compensation",
          needs_data=True, regularizer=bn_sparsity, regularizer_options=BN_SPARSITY_OPTIONS, figures=_figures,
          options=(*STRUCTURED_OPTIONS,
                   Option("stage1_share", (int, float, str), "auto", "auto: every channel removed or merged by "
                          "what it costs (never worse than stage 1); a number: the paper's fixed split, the share of "
                          "the MACs reduction taken by stage 1 (|γ| pruning), the rest by similarity merging (1 = "
                          "net-slim, 0 = merging only)", ("auto",), minimum=0, maximum=1),
                   Option("tau", (int, float, type(None)), None, "merge only pairs whose R² of x_j ≈ a·x_i + b "
                          "exceeds this at every layer reading them (default: 0.9 with a numeric stage1_share, as "
                          "the paper; no floor with auto)", minimum=0, maximum=1),
                   Option("calibration_batches", int, 8, "training batches whose activations the fits use",
                          minimum=1)))
def imp_sim(model: nn.Module, ctx: Context, *, speedup: float | None, ignored_layers: list | None, min_keep: int,
            round_to: int | None, stage1_share: float | str, tau: float | None,
            calibration_batches: int) -> PruneResult:
    """Stage 1 then stage 2 toward ``speedup``; the model is left untouched if the target is out of reach.

    Stage 1 only masks its channels (zero weights, γ and β: the masked net computes what the pruned one
    will), so stage 2 measures the net as stage 1 leaves it and both are removed together at the end.
    ``info``: channels removed per stage, the merged pairs, every channel's best R² for the histogram.
    """
    if round_to is not None and stage1_share != 1:
        raise PrunekitError("imp-sim: stage 2 merges single channels, so round_to works only with stage1_share=1")
    speedup = speedup or 1.0
    pg = ctx.graph(model, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
    before = cost(model, pg.base_macs)
    gamma = {g.index: s for g in pg.groups if (s := criteria.scores(g, "net-slim")) is not None}
    if stage1_share == "auto":
        batches = ctx.batches(calibration_batches, "data", "imp-sim")
        remove, keep, info = auto(model, pg, batches, gamma, speedup, tau or 0.0)
        after = cost(model, pg.apply(remove))
        name = {g.index: g.name for g in pg.groups}
        info = {"stage1_share": "auto", "tau": tau, **info}
        return PruneResult(model, "imp-sim", {"speedup": speedup, "stage1_share": "auto", "tau": tau}, before,
                           after, {name[gi]: (pg.groups[gi].size, keep[gi]) for gi in remove},
                           {name[gi]: idx for gi, idx in remove.items()}, info=info)
    tau = 0.9 if tau is None else tau
    keep = thresholds.global_keep_for_speedup(pg, gamma, stage1_speedup(speedup, stage1_share))
    stage1 = {gi: thresholds.lowest(gamma[gi], k, pg.groups[gi].chunks) for gi, k in keep.items()}
    keep = {g.index: g.size for g in pg.groups} | keep
    merges, best = [], []
    if stage1_share < 1:
        batches = ctx.batches(calibration_batches, "data", "imp-sim")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            merges, best = stage2(model, pg, batches, stage1, gamma, keep, speedup, tau)
        except BaseException:  # out of reach (or interrupted): leave the model as it came
            model.load_state_dict(saved)
            raise
    remove = {gi: sorted(set(stage1.get(gi, [])) | {j for g, j, _, _ in merges if g == gi}) for gi in keep}
    remove = {gi: idx for gi, idx in remove.items() if idx}
    after = cost(model, pg.apply(remove))
    name = {g.index: g.name for g in pg.groups}
    info = {
        "stage1_share": stage1_share, "tau": tau, "stage1_speedup": stage1_speedup(speedup, stage1_share),
        "stage1_channels": sum(len(v) for v in stage1.values()), "stage2_channels": len(merges),
        "pairs": [{"group": name[gi], "removed": j, "partner": i, "r2": round(r, 6)} for gi, j, i, r in merges],
        "similarity": [round(v, 4) for v in best],
    }
    return PruneResult(model, "imp-sim", {"speedup": speedup, "stage1_share": stage1_share, "tau": tau}, before,
                       after, {name[gi]: (pg.groups[gi].size, keep[gi]) for gi in remove},
                       {name[gi]: idx for gi, idx in remove.items()}, info=info)
