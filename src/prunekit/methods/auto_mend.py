"""S2 auto-mend: pre-prune by a rule, then mend the layer widths by architecture search.

Su Qihang et al. (Pattern Recognition and Artificial Intelligence 35(1), 2022) argue that greedy
train → prune → fine-tune cannot find the best pruned structure and add a *mending* stage: a
neural-architecture search adjusts the widths of the pre-pruned network, and the pre-pruning
filter ranking makes evaluating a candidate cheap (no training). Steps, as we read them (SPEC §4 S2):

1. Pre-prune: rank each coupled group's channels by group L1 norm and keep the same ratio per group
   at the MACs target → widths w⁰ and one ranking per group.
2. Search space: per group w = w⁰ + kΔ, k ∈ {−K…K}, Δ = round(size·step) in units of what the graph
   allows (1 channel, ``round_to``, grouped-conv blocks). A candidate whose analytic speedup lies
   outside target ± 1 % is repaired by nudging one group at a time, or rejected: never scored.
3. Search with a fixed candidate budget: evolution (as MetaPruning: the best half of everything
   scored so far breeds children by mutation and by uniform crossover) or random sampling, the
   baseline; both seeded. w⁰ is always the first candidate, so the result never scores below it.
4. Fast, honest scoring (adaptive BN, as EagleEye): a candidate keeps the top-w channels of the
   ranking, masked on the model itself (it computes what the pruned model would; no re-tracing),
   its BN statistics are reset and re-estimated as plain averages over a fixed set of training
   batches, then the task's metric (top-1, or mAP50-95 for detectors; ties: loss) is measured on the
   held-out split of the *training* data.
5. The winner is removed physically, keeping its re-estimated BN statistics; fine-tuning is the
   pipeline's ``finetune`` stage.

Scored candidates are cached by their widths and, with ``cache_path``, written to a JSON file after
each one, so a killed search resumes where it stopped: the seeded search replays its proposals and
finds the ones already scored in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import criteria, thresholds
from ..errors import PrunekitError
from ..graph import PruneGraph
from ..train import adapt_bn
from . import STRUCTURED_OPTIONS, Context, Option, PruneResult, cost, register

NAME = "auto-mend"
TOLERANCE = 0.01  # a scored candidate's analytic speedup lies within target ± 1 %
Widths = dict[int, int]  # group index -> channels kept


# ---- 2. the search space ----
class Space:
    """Widths w⁰ + kΔ per group, clamped to what the graph allows and repaired onto the MACs budget."""

    def __init__(self, pg: PruneGraph, w0: Widths, speedup: float, step: float, max_steps: int):
        self.pg, self.speedup, self.max_steps = pg, speedup, max_steps
        self.unit = {g.index: g.chunks * (pg.round_to or 1) for g in pg.groups}
        self.delta = {g.index: max(1, round(g.size * step / self.unit[g.index])) * self.unit[g.index]
                      for g in pg.groups}
        self.w0 = w0  # the rule's widths: the shape its own repair keeps
        self.w0 = self.repair(w0)
        if self.w0 is None:
            raise PrunekitError(f"{NAME}: cannot bring the pre-pruned widths within {TOLERANCE:.0%} of speedup "
                                f"{speedup:g} (min_keep={pg.min_keep}, round_to={pg.round_to}); try a smaller round_to")

    def speedup_of(self, w: Widths) -> float:
        """Analytic MACs ratio base / candidate (no forward pass)."""
        return self.pg.base_macs / max(self.pg.macs(w), 1)

    def within(self, w: Widths) -> bool:
        return abs(self.speedup_of(w) / self.speedup - 1) <= TOLERANCE

    def sample(self, rng: random.Random, gi: int) -> int:
        """A width for group ``gi`` on the grid w⁰ + kΔ, k uniform in {−K…K}."""
        return self.pg.clamp_keep(self.pg.groups[gi], self.w0[gi] + rng.randint(-self.max_steps, self.max_steps)
                                  * self.delta[gi])

    def repair(self, w: Widths, max_moves: int = 200) -> Widths | None:
        """``w`` nudged into the budget one unit at a time, or None if the nudges do not get there.

        Each move goes in the direction the budget needs; a move that lands inside it is preferred,
        else the group furthest from its pre-pruned width in that direction moves, so repairs keep
        the candidate's shape rather than pile onto one group.
        """
        w = dict(w)
        for _ in range(max_moves):
            if self.within(w):
                return w
            d = 1 if self.speedup_of(w) > self.speedup else -1  # +1: MACs to spare, widen a group
            moves = []
            for g in self.pg.groups:
                k = self.pg.clamp_keep(g, w[g.index] + d * self.unit[g.index])
                if k != w[g.index]:
                    moves.append((d * w[g.index] / self.w0[g.index], w | {g.index: k}))
            if not moves:
                return None
            landed = [m for m in moves if self.within(m[1])]
            w = min(landed or moves, key=lambda m: m[0])[1]
        return w if self.within(w) else None


# ---- 3. the search ----
def _rank(record: dict) -> tuple[float, float]:
    """Sort key of a scored candidate: the task's metric first (``score``: signed so higher is better), then loss."""
    return -record["score"], record["loss"]


def propose(space: Space, rng: random.Random, scored: list[dict], search: str, population: int,
            mutation: float) -> Widths | None:
    """The next candidate (repaired), or None if it cannot be brought within the budget.

    Random search, and evolution's first ``population`` candidates, sample every group on the grid;
    afterwards the best half of all scored candidates are parents: half the children take each
    group from one of two parents (uniform crossover), half resample each group of one parent with
    probability ``mutation`` (at least one group).
    """
    groups = list(space.w0)
    if search == "random" or len(scored) < population:
        return space.repair({gi: space.sample(rng, gi) for gi in groups})
    parents = [dict(zip(groups, r["widths"], strict=True)) for r in sorted(scored, key=_rank)[:max(2, population // 2)]]
    if rng.random() < 0.5:
        a, b = rng.sample(parents, 2)
        child = {gi: (a if rng.random() < 0.5 else b)[gi] for gi in groups}
    else:
        child = dict(rng.choice(parents))
        picked = [gi for gi in groups if rng.random() < mutation] or [rng.choice(groups)]
        child.update({gi: space.sample(rng, gi) for gi in picked})
    return space.repair(child)


class Cache:
    """Scored candidates by widths, optionally mirrored to a JSON file so a killed search resumes."""

    def __init__(self, path: str | None, setup: dict):
        self.path, self.setup = (Path(path) if path else None), setup
        self.known: dict[tuple[int, ...], dict] = {}
        if self.path and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise PrunekitError(f"{NAME}: cannot read cache_path {self.path}: {exc}") from exc
            if saved.get("setup") != setup:
                raise PrunekitError(f"{NAME}: cache_path {self.path} holds candidates of another model, target or "
                                    "data; delete it or choose another path")
            self.known = {tuple(r["widths"]): r for r in saved["candidates"]}

    def add(self, record: dict) -> None:
        self.known[tuple(record["widths"])] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"setup": self.setup, "candidates": list(self.known.values())}, f)
        os.replace(tmp, self.path)  # a kill never leaves half a file


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _figures(info: dict) -> list[tuple[str, bytes]]:
    """Search trajectory (best val metric against candidates scored) and chosen widths against w⁰ per group."""
    if not info.get("candidates"):
        return []
    from .. import plots  # matplotlib only when a report is drawn

    fig, ax = plots.plt.subplots(figsize=(6, 3.5))
    n = range(1, len(info["trajectory"]) + 1)
    metric = info.get("metric", "top1")
    ax.plot(n, [r[metric] for r in info["candidates"]], ".", color="0.6", label="candidate")
    ax.plot(n, info["trajectory"], "-", color="tab:red", label=f"best so far ({info['search']})")
    ax.axhline(info["candidates"][0][metric], color="tab:blue", ls="--", lw=1, label="w⁰ (pre-pruned)")
    ax.set_xlabel("candidates scored")
    ax.set_ylabel(f"val {metric} after adaptive BN")
    ax.legend(fontsize=8)
    search = plots.png(fig)

    fig, ax = plots.plt.subplots(figsize=(max(6, 0.45 * len(info["groups"])), 3.5))
    x = list(range(len(info["groups"])))
    ax.bar([i - 0.3 for i in x], info["sizes"], 0.3, color="0.8", label="original")
    ax.bar(x, info["w0"], 0.3, color="tab:blue", label="w⁰ (pre-pruned)")
    ax.bar([i + 0.3 for i in x], info["widths"], 0.3, color="tab:red", label="chosen")
    ax.set_xticks(x, info["groups"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.legend(fontsize=8)
    return [("search", search), ("widths", plots.png(fig))]


@register(NAME, "S2: pre-prune by l1-norm, mend the widths by evolutionary search scored with adaptive BN",
          needs_data=True, figures=_figures,
          options=(*STRUCTURED_OPTIONS,
                   Option("search", str, "evolution", "evolution (mutation + crossover) or random (baseline)",
                          ("evolution", "random")),
                   Option("candidates", int, 100, "candidates scored (the fixed search budget, w⁰ included)",
                          minimum=1),
                   Option("population", int, 16, "evolution: random candidates before breeding; parents = best half",
                          minimum=2),
                   Option("mutation", (int, float), 0.2, "evolution: chance that a child's group is resampled",
                          minimum=0, maximum=1),
                   Option("step", (int, float), 0.1, "Δ as a fraction of the group's channels", minimum=0,
                          maximum=1),
                   Option("max_steps", int, 2, "K: widths w⁰ + kΔ with k in -K..K", minimum=1),
                   Option("seed", int, 0, "search seed (same seed, same data: same widths)", minimum=0,
                          maximum=2 ** 32 - 1),
                   Option("calibration_batches", int, 50, "training batches re-estimating BN statistics",
                          minimum=1),
                   Option("val_batches", (int, type(None)), 10, "held-out batches scoring a candidate (null: all)",
                          minimum=1),
                   Option("cache_path", (str, type(None)), None, "JSON file of scored candidates: resume a search"),
                   Option("progress", bool, True, "show a progress bar")))
def auto_mend(model: nn.Module, ctx: Context, *, speedup: float | None, ignored_layers: list | None,
              min_keep: int, round_to: int | None, search: str, candidates: int, population: int,
              mutation: float, step: float, max_steps: int, seed: int, calibration_batches: int,
              val_batches: int | None, cache_path: str | None, progress: bool) -> PruneResult:
    """Pre-prune, search the widths around w⁰, and remove the best candidate's channels.

    ``info`` records every scored candidate (widths, analytic speedup, the task's val metric and loss, seconds),
    the best-so-far trajectory, w⁰ and the chosen widths per group, and the val score of the
    returned (physically pruned) model, which equals the winner's.
    """
    if step == 0:  # the other ranges are declared with the options
        raise PrunekitError(f"method {NAME!r}: step must be in (0, 1]")
    calib = ctx.batches(calibration_batches, "data", NAME)
    val = ctx.batches(val_batches or sys.maxsize, "val", NAME)
    metric = ctx.task.metric  # candidates are scored by the task's metric (top-1, mAP50-95)
    pg = ctx.graph(model, ignored_layers=ignored_layers, min_keep=min_keep, round_to=round_to)
    before = cost(model, pg.base_macs)
    speedup = speedup or 1.0

    # 1. pre-prune: one ranking per group, the same ratio per group
    ranking = {g.index: criteria.scores(g, "l1-norm") for g in pg.groups}
    w_rule = thresholds.local_keep_for_speedup(pg, speedup)
    space = Space(pg, w_rule, speedup, step, max_steps)
    groups = [g.index for g in pg.groups]

    def removal(w: Widths) -> dict[int, list[int]]:
        return {gi: thresholds.lowest(ranking[gi], w[gi], pg.groups[gi].chunks) for gi in groups
                if w[gi] < pg.groups[gi].size}

    original = {k: v.clone() for k, v in model.state_dict().items()}

    def mask(w: Widths) -> None:
        """The candidate on the model itself: original weights, its removed channels zeroed, BN re-estimated."""
        model.load_state_dict(original)
        pg.zero_channels(removal(w))
        adapt_bn(model, calib)

    setup = {"speedup": speedup, "groups": [pg.groups[gi].name for gi in groups], "w0": [space.w0[gi] for gi in groups],
             "calibration_batches": len(calib), "val_batches": len(val),
             "fingerprint": _fingerprint(*ranking.values(), calib[0][0], val[0][0])}
    cache = Cache(cache_path, setup)
    rng = random.Random(seed)
    scored: list[dict] = []
    seen: set[tuple[int, ...]] = set()
    fresh_seconds: list[float] = []
    t_search = time.perf_counter()
    bar = tqdm(total=candidates, desc=f"{NAME} {search}", disable=not progress or None, leave=False)
    try:
        attempts = 0
        while len(scored) < candidates and attempts < 50 * candidates:  # a small space can run out of new ones
            attempts += 1
            w = space.w0 if not scored else propose(space, rng, scored, search, population, mutation)
            key = None if w is None else tuple(w[gi] for gi in groups)
            if key is None or key in seen:
                continue
            seen.add(key)
            record = cache.known.get(key)
            if record is None:
                t0 = time.perf_counter()
                mask(w)
                metrics = ctx.evaluate(model, val)
                value = metrics[metric]
                record = {"widths": list(key), "speedup": space.speedup_of(w), metric: value,
                          "score": value if ctx.task.higher_is_better else -value,
                          "loss": metrics.get("loss", 0.0), "seconds": time.perf_counter() - t0}
                fresh_seconds.append(record["seconds"])
                cache.add(record)
            scored.append(record)
            bar.update()
            bar.set_postfix(best=f"{min(scored, key=_rank)[metric]:.2f}")
    finally:
        bar.close()
        model.load_state_dict(original)  # an interrupted search leaves the model as it came
    search_seconds = time.perf_counter() - t_search

    # 5. the winner, physically, with its re-estimated BN statistics
    best = min(scored, key=_rank)  # the first of equals: w⁰ wins ties
    chosen = dict(zip(groups, best["widths"], strict=True))
    mask(chosen)
    remove = removal(chosen)
    after = cost(model, pg.apply(remove))
    final = ctx.evaluate(model, val)
    best_so_far, trajectory = None, []
    for r in scored:
        best_so_far = r if best_so_far is None or _rank(r) < _rank(best_so_far) else best_so_far
        trajectory.append(best_so_far[metric])
    info = {
        "search": search, "seed": seed, "budget": candidates, "evaluated": len(scored),
        "resumed": len(scored) - len(fresh_seconds),
        "groups": setup["groups"], "sizes": [pg.groups[gi].size for gi in groups],
        "delta": [space.delta[gi] for gi in groups], "w_rule": [w_rule[gi] for gi in groups],
        "w0": setup["w0"], "widths": best["widths"],
        "metric": metric, "w0_score": {k: scored[0][k] for k in (metric, "loss")},
        "best_score": {k: best[k] for k in (metric, "loss")},
        "pruned_val": {metric: final[metric], "loss": final.get("loss", 0.0)},
        "candidates": scored, "trajectory": trajectory,
        "seconds_per_candidate": sum(fresh_seconds) / len(fresh_seconds) if fresh_seconds else None,
        "search_seconds": search_seconds,
        "calibration_images": sum(len(b[0]) for b in calib), "val_images": sum(len(b[0]) for b in val),
    }
    return PruneResult(model, NAME, {"speedup": speedup}, before, after,
                       {pg.groups[gi].name: (pg.groups[gi].size, chosen[gi]) for gi in groups},
                       {pg.groups[gi].name: idx for gi, idx in remove.items()}, info=info)
