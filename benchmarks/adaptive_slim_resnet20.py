"""S0 benchmark: adaptive-slim (learned threshold, recurrent) versus net-slim (fixed global percentile).

CPU protocol v1 (SPEC §6), issue 7. Every run starts from the *same* sparsified checkpoint (the
cached base after ``--sparsify-epochs`` of L1 sparsity training on BN γ), so the comparison isolates
the threshold rule, and every run gets the same post-base epoch budget (``--budget``, sparsity
training included):

- ``adaptive-slim``: round 1 prunes the shared checkpoint with the threshold learned from its |γ|;
  each further round first sparsifies the pruned network for ``--cycle-epochs`` (out of the budget),
  until a round removes < ``--stop-below`` of the MACs or ``--max-cycles``; the rest of the budget
  fine-tunes.
- ``adaptive-slim channels-only``: the same without block removal (an ablation: net-slim cannot
  remove blocks).
- ``net-slim`` at three fixed global percentiles bracketing adaptive-slim's choice, and at the
  speedups both adaptive-slim runs reached; each fine-tunes for the whole rest of the budget.

One JSON line per run is appended to ``--out`` as it finishes (a crash loses only the run in
progress); ``--table`` prints the Markdown table and ``--plot`` draws top-1 against MACs.

    python benchmarks/adaptive_slim_resnet20.py --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --out benchmarks/results/s0-resnet20.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from cifar_methods import BASE_CFG, FT_CFG, add_protocol_args, base_model

import prunekit as pk
from prunekit.criteria import bn_gamma
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.measure import measure
from prunekit.methods.adaptive_slim import sparsify
from prunekit.thresholds import learn_threshold
from prunekit.train import TrainConfig, evaluate, fit, resolve_device


def sparsify_cfg(args, epochs: int) -> TrainConfig:
    return TrainConfig(**dict(BASE_CFG, epochs=epochs, lr=args.sparsify_lr, schedule="constant", seed=args.seed))


def sparse_model(args, base, loaders, x, dev) -> tuple[torch.nn.Module, dict]:
    """The shared sparsified checkpoint, trained once and cached beside the base."""
    path = Path(args.cache) / f"{args.model}-e{args.base_epochs}-s{args.base_seed}-sparse-s{args.s:g}" \
                              f"-e{args.sparsify_epochs}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists():
        return pk.load(path), json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    model, res = sparsify(copy.deepcopy(base), *loaders, sparsify_cfg(args, args.sparsify_epochs), s=args.s,
                          example_inputs=x, device=dev, run_dir=path.parent / f"{path.stem}-run", resume=True,
                          desc=f"sparsify s={args.s:g}")
    pg = PruneGraph(model, x.to(dev))
    gammas = torch.cat([g for grp in pg.groups if (g := bn_gamma(model, grp)) is not None])
    fitted = learn_threshold(gammas)
    below = float((gammas < fitted.threshold).float().mean()) if fitted.threshold is not None else 0.0
    meta = {"top1": res.final["val_top1"], "epochs": args.sparsify_epochs, "s": args.s, "lr": args.sparsify_lr,
            "wall_s": round(time.perf_counter() - t0, 1), "channels": int(gammas.numel()),
            "learned_threshold": fitted.threshold, "fraction_below": below, "fit_reason": fitted.reason}
    pk.save(model, path)
    meta_path.write_text(json.dumps(meta))
    return model, meta


def adaptive_run(args, sparse, loaders, x, dev, layers: bool = True) -> tuple[torch.nn.Module, dict, int]:
    """Recurrent rounds (prune; then sparsify → prune ...) within the budget; returns epochs left to fine-tune.

    ``layers=False`` is the ablation without block removal: channels only, as net-slim.
    """
    model, left, cycles = copy.deepcopy(sparse), args.budget - args.sparsify_epochs, []
    for c in range(1, args.max_cycles + 1):
        if c > 1:
            if left - args.cycle_epochs < 1:  # keep at least one fine-tune epoch
                break
            model, _ = sparsify(model, *loaders, sparsify_cfg(args, args.cycle_epochs), s=args.s, example_inputs=x,
                                device=dev, desc=f"sparsify c{c}")
            left -= args.cycle_epochs
        top1_before = evaluate(model, loaders[1], dev)["top1"]
        result = pk.prune(model, "adaptive-slim", x, layers=layers)
        info = result.info
        cycles.append({"cycle": c, "threshold": info["threshold"], "top1_before": top1_before,
                       "top1_after": evaluate(model, loaders[1], dev)["top1"],
                       "channels_removed": sum(info["channels_removed"].values()),
                       "blocks_removed": info["blocks_removed"], "macs_removed": info["macs_removed"],
                       "reason": (info["channel_fit"] or {}).get("reason")})
        print(f"cycle {c}: threshold {info['threshold']}, {cycles[-1]['channels_removed']} channels and "
              f"{len(info['blocks_removed'])} blocks removed, MACs -{info['macs_removed']:.1%}", flush=True)
        if info["macs_removed"] < args.stop_below:
            break
    return model, {"cycles": cycles}, left


def closest_percentile(sparse, x, speedup: float) -> float:
    """The net-slim percentile whose MACs ratio is nearest ``speedup`` (bisection on the percentile).

    A global threshold moves in steps; when no step lands within the 3 % that ``speedup=`` demands,
    this is net-slim "at the same speedup" as closely as it can get.
    """
    def ratio(p: float) -> float:
        return pk.prune(copy.deepcopy(sparse), "net-slim", x, percentile=p).speedup

    lo, hi = 0.0, 99.9
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < speedup else (lo, mid)
    return min((lo, hi), key=lambda p: abs(math.log(ratio(p) / speedup)))


def percentiles_around(fraction: float) -> list[float]:
    """Three round percentiles (steps of 10) bracketing the share of channels adaptive-slim removed."""
    f = fraction * 100
    lo = min(max(math.floor(f / 10) * 10, 10), 70)
    return [lo - 10.0, lo, lo + 10.0] if f < lo + 5 and lo > 10 else [lo, lo + 10.0, lo + 20.0]


def run(args) -> None:
    dev = resolve_device(args.device)
    bundle = pk.data.load("cifar10", args.data_root, limit=args.limit)
    loaders = bundle.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.seed)
    x = torch.zeros(1, *bundle.input_shape)
    base, base_meta = base_model(args, bundle, *loaders, dev)
    sparse, sparse_meta = sparse_model(args, base, loaders, x, dev)
    print(f"base {base_meta['top1']:.2f}, sparsified {sparse_meta['top1']:.2f} "
          f"({sparse_meta['fraction_below']:.1%} of channels below the learned threshold)", flush=True)
    base_cost = measure(base.cpu(), x, repeats=args.repeats, threads=args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []

    def record(name: str, model, target: dict, top1_pruned: float, ft_epochs: int, extra: dict, t0: float) -> dict:
        model, res = fit(model, *loaders, TrainConfig(**dict(FT_CFG, epochs=ft_epochs, lr=args.ft_lr, seed=args.seed)),
                         device=dev, desc=f"fine-tune {name}") if ft_epochs else (model, None)
        cost = measure(model.cpu(), x, repeats=args.repeats, threads=args.threads)
        row = {"run": name, "target": target, "model": args.model, "dataset": "cifar10 (shared jpeg copy)",
               "base_top1": base_meta["top1"], "sparse_top1": sparse_meta["top1"], "top1_pruned": top1_pruned,
               "top1_finetuned": res.final["val_top1"] if res else evaluate(model, loaders[1], "cpu")["top1"],
               "speedup_macs": base_cost["macs"] / cost["macs"],
               "macs_before": base_cost["macs"], "macs_after": cost["macs"],
               "params_before": base_cost["params"], "params_after": cost["params"],
               "latency_ms_before_after": {b: (base_cost["latency"][b]["median_ms"], cost["latency"][b]["median_ms"])
                                           for b in cost["latency"]},
               "latency_threads": args.threads,
               "epochs": {"base": base_meta["epochs"], "sparsify_shared": args.sparsify_epochs,
                          "finetune": ft_epochs, "budget": args.budget},
               "sparsify": {k: sparse_meta[k] for k in ("s", "lr", "learned_threshold", "fraction_below")},
               "seed": args.seed, "train_device": str(dev), "host": platform.node(),
               "wall_s": round(time.perf_counter() - t0, 1),
               "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)} | extra
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{name}: {row['speedup_macs']:.2f}x MACs, top1 {top1_pruned:.2f} -> {row['top1_finetuned']:.2f}",
              flush=True)
        return row

    for name, layers in (("adaptive-slim", True), ("adaptive-slim channels-only", False)):
        if any(r["run"] == name for r in rows):
            continue
        t0 = time.perf_counter()
        model, extra, left = adaptive_run(args, sparse, loaders, x, dev, layers=layers)
        n_before = sum(g.size for g in PruneGraph(copy.deepcopy(sparse), x).groups)
        n_after = sum(g.size for g in PruneGraph(copy.deepcopy(model).cpu(), x).groups)
        extra["channel_fraction_removed"] = 1 - n_after / n_before
        record(name, model, {"learned": True, "layers": layers}, evaluate(model, loaders[1], dev)["top1"], left,
               extra, t0)
    ada = next(r for r in rows if r["run"] == "adaptive-slim")
    pcts = args.percentiles or percentiles_around(ada["channel_fraction_removed"])
    todo = [(f"net-slim p{p:g}", {"percentile": p}) for p in pcts]
    todo.append(("net-slim same-speedup", {"speedup": round(ada["speedup_macs"], 3)}))
    chan = next(r for r in rows if r["run"] == "adaptive-slim channels-only")
    todo.append(("net-slim same-speedup as channels-only", {"speedup": round(chan["speedup_macs"], 3)}))
    for name, target in todo:
        if any(r["run"] == name for r in rows):
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(sparse)
        try:
            pk.prune(model, "net-slim", x, **target)
        except PrunekitError as e:  # the global threshold steps over the target: take its nearest step
            p = closest_percentile(sparse, x, target["speedup"])
            print(f"{name}: {e}; using percentile {p:.3f}", flush=True)
            target = target | {"percentile": p, "note": "nearest reachable step of the global threshold"}
            model = copy.deepcopy(sparse)
            pk.prune(model, "net-slim", x, percentile=p)
        record(name, model, target, evaluate(model, loaders[1], dev)["top1"], args.budget - args.sparsify_epochs,
               {}, t0)

def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lines = ["| run | MACs | speedup | params | top-1 pruned | top-1 after budget | Δ vs base | "
             "latency b64 ratio (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["macs_after"]):
        b, a = r["latency_ms_before_after"]["b64"]
        lines.append(f"| {r['run']} | {r['macs_after'] / 1e6:.1f}M | {r['speedup_macs']:.2f}x | "
                     f"{r['params_after'] / 1e6:.3f}M | {r['top1_pruned']:.2f} | {r['top1_finetuned']:.2f} | "
                     f"{r['top1_finetuned'] - r['base_top1']:+.2f} | {b / a:.2f}x |")
    lines.append("")
    for r in rows:
        for c in r.get("cycles", []):
            cut = f"|γ| < {c['threshold']:.4f}" if c["threshold"] is not None else "none learned"
            lines.append(f"- {r['run']}, cycle {c['cycle']}: threshold {cut}, "
                         f"{c['channels_removed']} channels and {len(c['blocks_removed'])} blocks "
                         f"{c['blocks_removed']} removed, MACs −{c['macs_removed']:.1%}, top-1 {c['top1_before']:.2f} "
                         f"→ {c['top1_after']:.2f}" + (f" ({c['reason']})" if c["reason"] else ""))
    return "\n".join(lines)


def plot(path: Path, png: Path) -> None:
    """Top-1 after the budget against MACs: the fixed-percentile curve and adaptive-slim's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    fixed = sorted((r for r in rows if r["run"].startswith("net-slim p")), key=lambda r: r["macs_after"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["macs_after"] / 1e6 for r in fixed], [r["top1_finetuned"] for r in fixed], "o-", color="tab:blue",
            label="net-slim, fixed percentile")
    for r in fixed:
        ax.annotate(f"p{r['target']['percentile']:g}", (r["macs_after"] / 1e6, r["top1_finetuned"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    styles = {"net-slim same-speedup": ("s", "tab:blue"), "adaptive-slim": ("*", "tab:red"),
              "adaptive-slim channels-only": ("P", "tab:orange"),
              "net-slim same-speedup as channels-only": ("D", "tab:blue")}
    for r in rows:
        if r["run"] in styles:
            style = styles[r["run"]]
            ax.plot(r["macs_after"] / 1e6, r["top1_finetuned"], style[0], color=style[1], markersize=11,
                    label=r["run"])
    ax.axhline(rows[0]["base_top1"], color="grey", ls="--", lw=1, label="base")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 after budget (%)")
    ax.set_title(f"{rows[0]['model']} CIFAR-10: learned vs fixed |γ| threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--s", type=float, default=1e-2, help="L1 strength on BN γ during sparsity training")
    p.add_argument("--sparsify-epochs", type=int, default=1, help="shared sparsity training (counts in the budget)")
    p.add_argument("--sparsify-lr", type=float, default=0.02)
    p.add_argument("--cycle-epochs", type=int, default=1, help="sparsity training before each further round")
    p.add_argument("--max-cycles", type=int, default=2, help="2 leaves >= 2 fine-tune epochs of a budget of 4")
    p.add_argument("--stop-below", type=float, default=0.01)
    p.add_argument("--budget", type=int, default=4, help="post-base epochs of every run, sparsity training included")
    p.add_argument("--percentiles", type=lambda s: [float(v) for v in s.split(",")],
                   help="net-slim percentiles (default: three steps of 10 bracketing adaptive-slim)")
    p.add_argument("--out", default="benchmarks/results/s0-resnet20.jsonl")
    p.add_argument("--plot", nargs=2, metavar=("JSONL", "PNG"), help="only draw top-1 vs MACs")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
    elif args.plot:
        plot(Path(args.plot[0]), Path(args.plot[1]))
    else:
        run(args)


if __name__ == "__main__":
    main()
