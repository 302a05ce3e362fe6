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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import criteria, thresholds
from ..errors import PrunekitError
from ..graph import IN_CHANNEL_FNS, PruneGraph
from ..measure import hooked
from . import BN_SPARSITY_OPTIONS, STRUCTURED_OPTIONS, Context, Option, PruneResult, bn_sparsity, cost, register


# ---- 2. stage 1: BN |γ|, one global ranking ----
def stage1_speedup(speedup: float, share: float) -> float:
    """The speedup after stage 1 when it takes ``share`` of the MACs reduction that ``speedup`` asks for."""
    return 1.0 / (1.0 - share * (1.0 - 1.0 / speedup))


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


def _figures(info: dict) -> list[tuple[str, bytes]]:
    from ..plots import threshold_histogram  # matplotlib only when a report is drawn

    if not info.get("similarity"):
        return []
    return [("similarity", threshold_histogram(info["similarity"], info["tau"],
                                               "each channel's best R² (lowest over its reading layers)",
                                               xlabel="R² of x_j ≈ a·x_i + b with its best partner"))]


@register("imp-sim", "S3: BN-|γ| pruning, then linearly similar channels merged into a partner with compensation",
          needs_data=True, regularizer=bn_sparsity, regularizer_options=BN_SPARSITY_OPTIONS, figures=_figures,
          options=(*STRUCTURED_OPTIONS,
                   Option("stage1_share", (int, float), 0.5, "share of the MACs reduction taken by stage 1 "
                          "(|γ| pruning); the rest by similarity merging. 1 = net-slim, 0 = merging only"),
                   Option("tau", (int, float), 0.9, "merge only pairs whose R² of x_j ≈ a·x_i + b exceeds this "
                          "at every layer reading them"),
                   Option("calibration_batches", int, 8, "training batches whose activations the fits use")))
def imp_sim(model: nn.Module, ctx: Context, *, speedup: float | None, ignored_layers: list | None, min_keep: int,
            round_to: int | None, stage1_share: float, tau: float, calibration_batches: int) -> PruneResult:
    """Stage 1 then stage 2 toward ``speedup``; the model is left untouched if the target is out of reach.

    Stage 1 only masks its channels (zero weights, γ and β: the masked net computes what the pruned one
    will), so stage 2 measures the net as stage 1 leaves it and both are removed together at the end.
    ``info``: channels removed per stage, the merged pairs, every channel's best R² for the histogram.
    """
    if not 0 <= stage1_share <= 1:
        raise PrunekitError(f"imp-sim: stage1_share must be in [0, 1], got {stage1_share:g}")
    if calibration_batches < 1:
        raise PrunekitError(f"imp-sim: calibration_batches must be >= 1, got {calibration_batches}")
    if round_to is not None and stage1_share < 1:
        raise PrunekitError("imp-sim: stage 2 merges single channels, so round_to works only with stage1_share=1")
    speedup = speedup or 1.0
    pg = PruneGraph(model, ctx.example_inputs, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
    before = cost(model, pg.base_macs)
    gamma = {g.index: s for g in pg.groups if (s := criteria.scores(g, "net-slim")) is not None}
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
