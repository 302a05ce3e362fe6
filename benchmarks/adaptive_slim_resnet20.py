"""S0 benchmark: adaptive-slim (learned threshold, recurrent) versus net-slim (fixed global percentile).

CPU protocol v1 (SPEC §6), issue 7. Every run starts from the *same* sparsified checkpoint (the
cached base after ``--sparsify-epochs`` of L1 sparsity training on BN γ), so the comparison isolates
the threshold rule, and every run gets the same post-base epoch budget (``--budget``, sparsity
training included):

- ``adaptive-slim``: round 1 prunes the shared checkpoint with the threshold learned from its |γ|;
  each further round first sparsifies the pruned network for ``--cycle-epochs`` (out of the budget),
  until a round removes < ``--stop-below`` of the MACs or ``--max-cycles``; the rest of the budget
  fine-tunes. This runs as a ``prunekit run`` pipeline (``prune`` → ``cycle`` of ``sparsify`` →
  ``prune`` → ``finetune`` with ``epochs: rest`` of the run's ``budget``), the shipped recurrence.
- ``adaptive-slim channels-only``: the same without block removal (an ablation: net-slim cannot
  remove blocks).
- ``net-slim`` at three fixed global percentiles bracketing adaptive-slim's choice, and at the
  speedups both adaptive-slim runs reached; each fine-tunes for the whole rest of the budget.

Every run is a pipeline run under ``--runs`` (its config, log, report and held-out validation split
there); the pipelines hold out 10 % of the training split for their decisions and fine-tune on the
rest, and the test split gives the table. One JSON line per run is appended to ``--out`` as it
finishes (a crash loses only the run in progress); ``--table`` prints the Markdown table and
``--plot`` draws top-1 against MACs.

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
from cifar_methods import BASE_CFG, FT_CFG, add_protocol_args, base_model, cached

import prunekit as pk
from prunekit.criteria import bn_gamma
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.measure import measure
from prunekit.methods.adaptive_slim import sparsify
from prunekit.pipeline import run as pk_run
from prunekit.thresholds import learn_threshold
from prunekit.train import TrainConfig, evaluate, resolve_device


def sparsify_cfg(args, epochs: int) -> TrainConfig:
    return TrainConfig(**dict(BASE_CFG, epochs=epochs, lr=args.sparsify_lr, schedule="constant", seed=args.seed))


def sparse_model(args, base, bundle, x, dev) -> tuple[torch.nn.Module, dict, Path]:
    """The shared sparsified checkpoint, trained once and cached beside the base (validated on a held-out split)."""
    path = Path(args.cache) / f"{args.model}-e{args.base_epochs}-s{args.base_seed}-sparse-s{args.s:g}" \
                              f"-e{args.sparsify_epochs}.pt"

    def train() -> tuple[torch.nn.Module, dict]:
        t0 = time.perf_counter()
        held = bundle.holdout(0.1, seed=args.seed)
        train_loader, _ = held.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.seed)
        model, res = sparsify(copy.deepcopy(base), train_loader, held.eval_loader(held.val, 256, dev),
                              sparsify_cfg(args, args.sparsify_epochs), s=args.s, example_inputs=x, device=dev,
                              run_dir=path.parent / f"{path.stem}-run", resume=True, desc=f"sparsify s={args.s:g}")
        pg = PruneGraph(model, x.to(dev))
        gammas = torch.cat([g for grp in pg.groups if (g := bn_gamma(model, grp)) is not None])
        fitted = learn_threshold(gammas)
        below = float((gammas < fitted.threshold).float().mean()) if fitted.threshold is not None else 0.0
        return model, {"top1": evaluate(model, bundle.eval_loader(bundle.test, 256, dev), dev)["top1"],
                       "epochs": args.sparsify_epochs, "s": args.s, "lr": args.sparsify_lr,
                       "wall_s": round(time.perf_counter() - t0, 1), "channels": int(gammas.numel()),
                       "learned_threshold": fitted.threshold, "fraction_below": below, "fit_reason": fitted.reason}

    return (*cached(path, train), path)


def pipeline_config(args, name: str, sparse_path: Path, method: str, params: dict, target: dict,
                    stages: list[dict]) -> dict:
    """A ``prunekit run`` config starting from the shared sparsified checkpoint, within the same budget."""
    data = {"name": "cifar10", "root": args.data_root, "batch_size": BASE_CFG["batch_size"]}
    if args.limit:
        data["limit"] = args.limit
    return {"name": name, "model": {"checkpoint": str(sparse_path)}, "data": data,
            "method": {"name": method, "params": params}, "target": target,
            "budget": args.budget - args.sparsify_epochs, "device": args.device, "seed": args.seed,
            "out": str(Path(args.runs) / name.replace(" ", "-")), "stages": stages}


def finetune_rest(args) -> dict:
    return {"stage": "finetune", "epochs": "rest", "lr": args.ft_lr,
            **{k: v for k, v in FT_CFG.items() if k not in ("epochs", "lr")}}


def adaptive_config(args, name: str, sparse_path: Path, layers: bool) -> dict:
    """Round 1 prunes the shared checkpoint; each further round sparsifies first (``cycle``); the rest fine-tunes.

    ``layers=False`` is the ablation without block removal: channels only, as net-slim.
    """
    stages: list[dict] = [{"stage": "prune"}]
    if args.max_cycles > 1:
        sparsify = {"stage": "sparsify", "epochs": args.cycle_epochs, "lr": args.sparsify_lr, "schedule": "constant",
                    "s": args.s}
        stages.append({"stage": "cycle", "max_cycles": args.max_cycles - 1, "stop_below": args.stop_below,
                       "stages": [sparsify, {"stage": "prune"}]})
    stages.append(finetune_rest(args))
    return pipeline_config(args, name, sparse_path, "adaptive-slim", {"layers": layers}, {"learned": True}, stages)


def cycles_of(run_dir: Path) -> list[dict]:
    """What each prune round of a pipeline run learned and removed, from its stage records."""
    out = []
    for i, d in enumerate(sorted(p for p in (run_dir / "stages").iterdir() if "-prune" in p.name), start=1):
        rec = json.loads((d / "stage.json").read_text())
        info = rec["prune"]["info"]
        out.append({"cycle": i, "threshold": info["threshold"], "blocks_removed": info["blocks_removed"],
                    "val_top1_after": rec["metric"],
                    "channels_removed": sum(info["channels_removed"].values()), "macs_removed": info["macs_removed"],
                    "reason": (info["channel_fit"] or {}).get("reason")})
    return out


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
    x = pk.data.example_inputs(bundle)
    base, base_meta = base_model(args, bundle, *loaders, dev)
    sparse, sparse_meta, sparse_path = sparse_model(args, base, bundle, x, dev)
    print(f"base {base_meta['top1']:.2f}, sparsified {sparse_meta['top1']:.2f} "
          f"({sparse_meta['fraction_below']:.1%} of channels below the learned threshold)", flush=True)
    base_cost = measure(base.cpu(), x[:1], repeats=args.repeats, threads=args.threads)
    test_loader = bundle.eval_loader(bundle.test, 256, dev)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []

    def record(cfg: dict, extra=lambda model: {}) -> dict:
        """Run the pipeline ``cfg`` and append its row; ``extra(final model)`` adds run-specific fields."""
        t0 = time.perf_counter()
        metrics = pk_run(cfg)
        run_dir = Path(cfg["out"])
        last_prune = sorted(p for p in (run_dir / "stages").iterdir() if "-prune" in p.name)[-1]
        pruned = pk.load(last_prune / "model.pt")
        model = pk.load(sorted((run_dir / "stages").iterdir())[-1] / "model.pt")
        cost = measure(model.cpu(), x[:1], repeats=args.repeats, threads=args.threads)
        epochs = [json.loads(r) for r in (run_dir / "log.jsonl").read_text().splitlines() if '"epoch"' in r]
        row = {"run": cfg["name"], "target": cfg["target"] | cfg["method"]["params"], "model": args.model,
               "dataset": "cifar10 (shared jpeg copy)", "base_top1": base_meta["top1"],
               "sparse_top1": sparse_meta["top1"], "top1_pruned": evaluate(pruned, test_loader, dev)["top1"],
               "top1_finetuned": metrics["after"]["top1"], "speedup_macs": base_cost["macs"] / cost["macs"],
               "macs_before": base_cost["macs"], "macs_after": cost["macs"],
               "params_before": base_cost["params"], "params_after": cost["params"],
               "latency_ms_before_after": {b: (base_cost["latency"][b]["median_ms"], cost["latency"][b]["median_ms"])
                                           for b in cost["latency"]},
               "latency_threads": args.threads,
               "epochs": {"base": base_meta["epochs"], "sparsify_shared": args.sparsify_epochs,
                          "after_shared": len(epochs), "budget": args.budget},
               "sparsify": {k: sparse_meta[k] for k in ("s", "lr", "learned_threshold", "fraction_below")},
               "split": metrics["split"], "run_dir": str(run_dir), "seed": args.seed, "train_device": str(dev),
               "host": platform.node(), "wall_s": round(time.perf_counter() - t0, 1),
               "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)} | extra(model)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{row['run']}: {row['speedup_macs']:.2f}x MACs, top1 {row['top1_pruned']:.2f} -> "
              f"{row['top1_finetuned']:.2f}", flush=True)
        return row

    n_before = sum(g.size for g in PruneGraph(copy.deepcopy(sparse), x).groups)
    for name, layers in (("adaptive-slim", True), ("adaptive-slim channels-only", False)):
        if any(r["run"] == name for r in rows):
            continue
        cfg = adaptive_config(args, name, sparse_path, layers)
        record(cfg, lambda final, cfg=cfg: {
            "cycles": cycles_of(Path(cfg["out"])),
            "channel_fraction_removed": 1 - sum(g.size for g in PruneGraph(final, x).groups) / n_before})
    ada = next(r for r in rows if r["run"] == "adaptive-slim")
    pcts = args.percentiles or percentiles_around(ada["channel_fraction_removed"])
    todo = [(f"net-slim p{p:g}", {"percentile": p}, {}) for p in pcts]
    todo.append(("net-slim same-speedup", {}, {"speedup": round(ada["speedup_macs"], 3)}))
    chan = next(r for r in rows if r["run"] == "adaptive-slim channels-only")
    todo.append(("net-slim same-speedup as channels-only", {}, {"speedup": round(chan["speedup_macs"], 3)}))
    for name, params, target in todo:
        if any(r["run"] == name for r in rows):
            continue
        note = {}
        if target:
            try:
                pk.prune(copy.deepcopy(sparse), "net-slim", x, **target)
            except PrunekitError as e:  # the global threshold steps over the target: take its nearest step
                p = closest_percentile(sparse, x, target["speedup"])
                print(f"{name}: {e}; using percentile {p:.3f}", flush=True)
                params, target = {"percentile": p}, {}
                note = {"note": "nearest reachable step of the global threshold"}
        record(pipeline_config(args, name, sparse_path, "net-slim", params, target,
                               [{"stage": "prune"}, finetune_rest(args)]), lambda _model, note=note: note)


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
            top1 = (f"top-1 {c['top1_before']:.2f} → {c['top1_after']:.2f}" if "top1_before" in c  # older rows
                    else f"held-out val top-1 after {c['val_top1_after']:.2f}")
            lines.append(f"- {r['run']}, cycle {c['cycle']}: threshold {cut}, "
                         f"{c['channels_removed']} channels and {len(c['blocks_removed'])} blocks "
                         f"{c['blocks_removed']} removed, MACs −{c['macs_removed']:.1%}, {top1}"
                         + (f" ({c['reason']})" if c["reason"] else ""))
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
    p.add_argument("--runs", default="runs/s0-bench", help="directory of the pipeline runs")
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
