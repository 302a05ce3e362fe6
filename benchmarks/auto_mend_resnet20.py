"""S2 benchmark: auto-mend (evolution) vs random search vs pre-pruned only vs one global l1 ranking.

CPU protocol v1 (SPEC §6), issue 14. Every run prunes the *same* cached ResNet-20 base to the same
MACs target and gets the same fine-tune budget:

- ``pre-pruned``: l1-norm ranking, same ratio per group (the rule auto-mend starts from, w⁰);
- ``auto-mend``: w⁰ mended by evolutionary search (``--candidates`` scored candidates);
- ``random-search``: auto-mend's space and scoring with random sampling, the same candidate budget;
- ``global-l1``: one normalised l1 ranking across groups (DepGraph-style widths).

Decisions use a held-out 10 % of the *training* split (``bundle.holdout``); the test split is
read only for the table. Every pruned model gets adaptive BN on the same fixed calibration batches
(auto-mend's own scoring), then its val score and test top-1 are recorded before and after the
fine-tune. One JSON line per run is appended to ``--out`` as it finishes; runs already there are
skipped. ``--kendall N`` adds the correlation check: N candidates of the random search spread over
its scores, each fine-tuned ``--kendall-steps`` steps; Kendall τ of val top-1 after that against
the adaptive-BN score (and against the score with the base's stale BN statistics).

    python benchmarks/auto_mend_resnet20.py --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --speedups 3.0 --out benchmarks/results/s2-resnet20.jsonl
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from protocol import BASE_CFG, FT_CFG, add_protocol_args, base_model

import prunekit as pk
from prunekit import criteria, thresholds
from prunekit.graph import PruneGraph
from prunekit.measure import count_params
from prunekit.train import TrainConfig, adapt_bn, evaluate, fit, resolve_device

RUNS = ("pre-pruned", "auto-mend", "random-search", "global-l1")


def prune_run(name: str, model, x, calib, val, speedup: float, args) -> dict:
    """Prune ``model`` in place as run ``name``; returns what the row records about the pruning itself."""
    if name in ("auto-mend", "random-search"):
        r = pk.prune(model, "auto-mend", x, speedup=speedup, data=calib, val=val, seed=args.seed,
                     search="evolution" if name == "auto-mend" else "random", candidates=args.candidates,
                     population=args.population, calibration_batches=len(calib), val_batches=None,
                     cache_path=str(Path(args.search_cache) / f"{name}-{speedup:g}x-s{args.seed}.json"))
        keep = ("w0", "widths", "groups", "sizes", "w0_score", "best_score", "trajectory", "seconds_per_candidate",
                "search_seconds", "evaluated", "resumed", "calibration_images", "val_images")
        return {"speedup_macs": r.speedup, **{k: r.info[k] for k in keep},
                "candidates": [{k: c[k] for k in ("widths", "speedup", "top1", "loss")} for c in r.info["candidates"]]}
    r = pk.prune(model, "l1-norm", x, speedup=speedup, ranking="local" if name == "pre-pruned" else "global")
    return {"speedup_macs": r.speedup, "widths": [k for _, k in r.channels.values()], "groups": list(r.channels)}


def prune_to(base, x, widths: list[int]):
    """A copy of ``base`` keeping the top-``widths`` l1-norm channels per group (auto-mend's candidate)."""
    model = copy.deepcopy(base)
    pg = PruneGraph(model, x)
    pg.apply({g.index: thresholds.lowest(criteria.scores(g, "l1-norm"), w, g.chunks)
              for g, w in zip(pg.groups, widths, strict=True) if w < g.size})
    return model


def kendall(args, base, x, calib, val, train_loader, dev, rows, out) -> None:
    """Kendall τ between the adaptive-BN score and val top-1 after a short fine-tune, over N candidates.

    Each fine-tuned point is cached in ``--search-cache`` as it finishes, so a killed check resumes.
    """
    from scipy.stats import kendalltau

    src = next(r for r in rows if r["run"] == "random-search" and r["speedup_target"] == args.speedups[0])
    cands = sorted(src["candidates"], key=lambda c: c["top1"])
    picks = [cands[round(i * (len(cands) - 1) / (args.kendall - 1))] for i in range(args.kendall)]
    steps = list(itertools.islice(iter(train_loader), args.kendall_steps))
    cache = Path(args.search_cache) / f"kendall-{args.speedups[0]:g}x-s{args.seed}-{args.kendall_steps}steps.json"
    done = {tuple(p["widths"]): p for p in json.loads(cache.read_text())} if cache.exists() else {}
    t0 = time.perf_counter()
    points, resumed = [], 0
    for c in picks:
        if tuple(c["widths"]) in done:
            points.append(done[tuple(c["widths"])])
            resumed += 1
            continue
        t1 = time.perf_counter()
        model = prune_to(base, x, c["widths"])
        stale = evaluate(model, val, dev)["top1"]
        adapt_bn(model, calib)
        score = evaluate(model, val, dev)["top1"]
        cfg = TrainConfig(**dict(FT_CFG, epochs=1, lr=args.ft_lr, seed=args.seed))
        model, _ = fit(model, steps, None, cfg, device=dev, desc=f"kendall {len(points) + 1}/{len(picks)}")
        points.append({"widths": c["widths"], "search_top1": c["top1"], "stale_bn_top1": stale,
                       "adaptive_bn_top1": score, "finetuned_top1": evaluate(model, val, dev)["top1"],
                       "seconds": round(time.perf_counter() - t1, 1)})
        done[tuple(c["widths"])] = points[-1]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(list(done.values())))
        print(points[-1], flush=True)
    after = [p["finetuned_top1"] for p in points]
    tau_a = kendalltau([p["adaptive_bn_top1"] for p in points], after)
    tau_s = kendalltau([p["stale_bn_top1"] for p in points], after)
    row = {"run": "kendall", "model": args.model, "speedup_target": args.speedups[0], "source": "random-search",
           "steps": args.kendall_steps, "lr": args.ft_lr, "schedule": FT_CFG["schedule"],
           "batch_size": FT_CFG["batch_size"], "seed": args.seed, "base_seed": args.base_seed,
           "calibration": {"batches": len(calib), "batch_size": args.calibration_batch_size},
           "val_images": sum(len(b[1]) for b in val), "points": points,
           "tau_adaptive_bn": tau_a.statistic, "p_adaptive_bn": tau_a.pvalue,
           "tau_stale_bn": tau_s.statistic, "p_stale_bn": tau_s.pvalue,
           "wall_s": round(time.perf_counter() - t0, 1), "resumed": resumed,
           "host": platform.node(), "threads": torch.get_num_threads(),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"kendall tau: adaptive BN {tau_a.statistic:.2f} (p={tau_a.pvalue:.3f}), "
          f"stale BN {tau_s.statistic:.2f} (p={tau_s.pvalue:.3f})", flush=True)


def run(args) -> None:
    dev = resolve_device(args.device)
    full = pk.data.load("cifar10", args.data_root, limit=args.limit)  # the v1 base: all 50,000 training images
    loaders = full.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.base_seed)
    base, base_meta = base_model(args, full, *loaders, dev)
    base = base.to(dev).to(memory_format=torch.channels_last).eval()  # ~3x faster BN passes on CPU
    bundle = full.holdout(0.1, seed=args.seed)
    train_loader, _ = bundle.loaders(batch_size=FT_CFG["batch_size"], device=dev, seed=args.seed)
    val = [(v.contiguous(memory_format=torch.channels_last), y)
           for v, y in list(bundle.eval_loader(bundle.val, 256, dev))[: args.val_batches]]
    test = bundle.eval_loader(bundle.test, 256, dev)
    calib = [(c.contiguous(memory_format=torch.channels_last), y) for c, y in itertools.islice(
        iter(bundle.eval_loader(bundle.train, args.calibration_batch_size, dev, shuffle=True, seed=0)),
        args.calibration_batches)]
    x = pk.data.example_inputs(bundle).to(dev)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []
    for speedup in args.speedups:
        for name in args.runs:
            if any(r["run"] == name and r["speedup_target"] == speedup for r in rows):
                continue
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            row = {"run": name, "model": args.model, "dataset": "cifar10 (shared jpeg copy), 10 % of train held out",
                   "speedup_target": speedup, **prune_run(name, model, x, calib, val, speedup, args)}
            adapt_bn(model, calib)  # idempotent for auto-mend, whose winner already has these statistics
            pruned_val = evaluate(model, val, dev)
            pruned_test = evaluate(model, test, dev)["top1"]
            # --ft-steps: one short pass over the first N training batches (one-cycle over those steps)
            ft_data = list(itertools.islice(iter(train_loader), args.ft_steps)) if args.ft_steps else train_loader
            cfg = TrainConfig(**dict(FT_CFG, epochs=1 if args.ft_steps else args.ft_epochs, lr=args.ft_lr,
                                     seed=args.seed))
            model, res = fit(model, ft_data, val, cfg, device=dev, desc=f"{name} {speedup}x") \
                if cfg.epochs else (model, None)
            row |= {"base_top1": base_meta["top1"], "val_top1_adaptive_bn": pruned_val["top1"],
                    "val_loss_adaptive_bn": pruned_val["loss"], "test_top1_pruned": pruned_test,
                    "val_top1_finetuned": res.final["val_top1"] if res else None,
                    "test_top1_finetuned": evaluate(model, test, dev)["top1"],
                    "params_after": count_params(model),
                    "finetune": {"epochs": None if args.ft_steps else args.ft_epochs, "steps": args.ft_steps,
                                 "lr": args.ft_lr, "schedule": FT_CFG["schedule"]},
                    "calibration": {"batches": len(calib), "batch_size": args.calibration_batch_size},
                    "val_images": sum(len(b[1]) for b in val), "seed": args.seed, "base_seed": args.base_seed,
                    "base_epochs": base_meta["epochs"], "train_device": str(dev), "host": platform.node(),
                    "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1),
                    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{name:>14} {speedup}x: {row['speedup_macs']:.2f}x MACs, val (adaptive BN) "
                  f"{pruned_val['top1']:.2f}, test {pruned_test:.2f} -> {row['test_top1_finetuned']:.2f}", flush=True)
    kout = Path(args.kendall_out)
    if args.kendall and not (kout.exists() and any(
            json.loads(r)["run"] == "kendall" and json.loads(r)["steps"] == args.kendall_steps
            for r in kout.read_text().splitlines())):
        kendall(args, base, x, calib, val, train_loader, dev, rows, kout)


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lines = ["| target | run | MACs ratio | val top-1 adaptive BN | test top-1 pruned | fine-tune | "
             "test top-1 fine-tuned | Δ vs base | s / candidate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["run"] != "kendall"), key=lambda r: (r["speedup_target"], r["run"])):
        spc = f"{r['seconds_per_candidate']:.2f}" if r.get("seconds_per_candidate") else "–"
        ft = r.get("finetune") or {}
        ft = f"{ft['steps']} steps" if ft.get("steps") else f"{ft.get('epochs')} epochs"
        lines.append(f"| {r['speedup_target']}x | {r['run']} | {r['speedup_macs']:.2f}x | "
                     f"{r['val_top1_adaptive_bn']:.2f} | {r['test_top1_pruned']:.2f} | {ft} | "
                     f"{r['test_top1_finetuned']:.2f} "
                     f"| {r['test_top1_finetuned'] - r['base_top1']:+.2f} | {spc} |")
    for r in rows:
        if r["run"] == "kendall":
            lines.append(f"\nKendall τ over {len(r['points'])} candidates ({r['speedup_target']}x, {r['steps']} "
                         f"fine-tune steps): adaptive BN {r['tau_adaptive_bn']:.2f}"
                         f" (p={r.get('p_adaptive_bn', float('nan')):.3f}), stale BN {r['tau_stale_bn']:.2f}"
                         f" (p={r.get('p_stale_bn', float('nan')):.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[3.0])
    p.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS))
    p.add_argument("--candidates", type=int, default=100, help="search budget of auto-mend and random search")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--calibration-batches", type=int, default=20)
    p.add_argument("--calibration-batch-size", type=int, default=64)
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches of 256 scoring a candidate")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--ft-steps", type=int, help="fine-tune only this many training batches instead of epochs")
    p.add_argument("--kendall", type=int, default=0, help="candidates in the Kendall τ check (0: skip)")
    p.add_argument("--kendall-steps", type=int, default=100)
    p.add_argument("--kendall-out", default="benchmarks/results/s2-resnet20-kendall.jsonl",
                   help="JSONL the Kendall τ row goes to (candidates come from --out's random-search row)")
    p.add_argument("--search-cache", default="cache/auto-mend", help="JSON caches of scored candidates (resume)")
    p.add_argument("--out", default="benchmarks/results/s2-resnet20.jsonl")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
    else:
        run(args)


if __name__ == "__main__":
    main()
