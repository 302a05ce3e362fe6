"""S3 benchmark: imp-sim (|γ| pruning + similarity merging) versus its stage 1 alone (net-slim) and l1-norm.

CPU protocol v1 (SPEC §6), issue 13. Every |γ| run starts from the *same* sparsified checkpoint (the
cached base after ``--sparsify-epochs`` of L1 sparsity training on BN γ, on the training split with a
held-out validation part), so imp-sim and its stage 1 alone differ only by stage 2; l1-norm prunes the
base itself. Calibration batches for stage 2 come from the training split (no augmentation); the test
split is used only for the numbers in the table.

- ``stage-1 only``: imp-sim with ``stage1_share=1``, which is net-slim's global |γ| ranking;
- ``imp-sim share/τ``: ``stage1_share`` of the MACs reduction by |γ|, the rest by merging pairs with
  R² > τ (one run per ``--variants`` pair);
- ``l1-norm``: the base pruned by group L1 norm, same ratio per layer.

For each target the top-1 straight after pruning (the value of compensation) is written first; for
the targets in ``--finetune-at`` each run then gets ``--ft-epochs`` of fine-tuning. One JSON line per
run and phase is appended to ``--out`` as it finishes; ``--table`` prints the Markdown table.

    python benchmarks/imp_sim_resnet20.py --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --out benchmarks/results/s3-resnet20.jsonl
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from cifar_methods import BASE_CFG, FT_CFG, add_protocol_args, base_model, cached

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.measure import count_params
from prunekit.methods.adaptive_slim import sparsify
from prunekit.train import TrainConfig, evaluate, fit, resolve_device


def sparse_model(args, base, train_loader, val_loader, test_loader, x, dev) -> tuple[torch.nn.Module, dict]:
    """The shared sparsified checkpoint (training split minus the held-out part), trained once and cached."""
    path = Path(args.cache) / (f"{args.model}-e{args.base_epochs}-s{args.base_seed}-sparse-s{args.s:g}"
                               f"-e{args.sparsify_epochs}-holdout{args.holdout:g}.pt")

    def train() -> tuple[torch.nn.Module, dict]:
        t0 = time.perf_counter()
        cfg = TrainConfig(**dict(BASE_CFG, epochs=args.sparsify_epochs, lr=args.sparsify_lr, schedule="constant",
                                 seed=args.seed))
        model, res = sparsify(copy.deepcopy(base), train_loader, val_loader, cfg, s=args.s, example_inputs=x,
                              device=dev, run_dir=path.parent / f"{path.stem}-run", resume=True,
                              desc=f"sparsify s={args.s:g}")
        return model, {"val_top1": res.final["val_top1"], "test_top1": evaluate(model, test_loader, dev)["top1"],
                       "epochs": args.sparsify_epochs, "s": args.s, "lr": args.sparsify_lr,
                       "wall_s": round(time.perf_counter() - t0, 1)}

    return cached(path, train)


def run(args) -> None:
    dev = resolve_device(args.device)
    full = pk.data.load("cifar10", args.data_root, limit=args.limit)
    bundle = full.holdout(args.holdout, seed=args.seed)
    train_loader, test_loader = bundle.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.seed)
    val_loader = bundle.eval_loader(bundle.val, device=dev)
    calib = list(itertools.islice(bundle.eval_loader(bundle.train, batch_size=BASE_CFG["batch_size"], shuffle=True,
                                                     seed=args.seed), args.calibration_batches))  # fixed set
    x = pk.data.example_inputs(bundle)
    base, base_meta = base_model(args, full, *full.loaders(batch_size=BASE_CFG["batch_size"], device=dev), dev)
    sparse, sparse_meta = sparse_model(args, base, train_loader, val_loader, test_loader, x, dev)
    base_top1, sparse_top1 = base_meta["top1"], sparse_meta["test_top1"]
    print(f"base {base_top1:.2f}, sparsified {sparse_top1:.2f} (test top-1)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []
    done = {(r["run"], r["speedup_target"], r["ft_epochs"]) for r in rows if "error" not in r}
    failed = {(r["run"], r["speedup_target"]) for r in rows if "error" in r}
    runs = {"stage-1 only": ("imp-sim", sparse, {"stage1_share": 1.0})}
    for share, tau in args.variants:
        runs[f"imp-sim {share:g}/{tau:g}"] = ("imp-sim", sparse, {"stage1_share": share, "tau": tau,
                                                                  "calibration_batches": args.calibration_batches})
    runs["l1-norm"] = ("l1-norm", base, {})
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    def record(name: str, speedup: float, result, model, top1_pruned: float, ft_epochs: int, top1_ft, t0) -> None:
        method, _, opts = runs[name]
        info = result.info if method == "imp-sim" else {}
        row = {"run": name, "method": method, "options": opts, "model": args.model,
               "dataset": "cifar10 (shared jpeg copy)", "speedup_target": speedup, "speedup_macs": result.speedup,
               "base_top1": base_top1, "sparse_top1": sparse_top1, "top1_pruned": top1_pruned,
               "ft_epochs": ft_epochs, "top1_finetuned": top1_ft,
               "macs_before": result.before["macs"], "macs_after": result.after["macs"],
               "params_before": result.before["params"], "params_after": count_params(model),
               "stage1_channels": info.get("stage1_channels"), "stage2_channels": info.get("stage2_channels"),
               "pairs_r2": [p["r2"] for p in info.get("pairs", [])], "similarity": info.get("similarity"),
               "epochs": {"base": base_meta["epochs"], "sparsify_shared": args.sparsify_epochs,
                          "finetune": ft_epochs},
               "sparsify": sparse_meta, "holdout": args.holdout, "seed": args.seed, "train_device": str(dev),
               "host": platform.node(), "wall_s": round(time.perf_counter() - t0, 1), "command": command}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        ft = f" -> {top1_ft:.2f} after {ft_epochs} epochs" if top1_ft is not None else ""
        print(f"{name:>13} {speedup}x: {result.speedup:.2f}x MACs, top1 {top1_pruned:.2f}{ft}", flush=True)

    def pruned(name: str, speedup: float):
        method, start, opts = runs[name]
        model = copy.deepcopy(start).cpu()
        return model, pk.prune(model, method, x, speedup=speedup, data=calib if method == "imp-sim" else None, **opts)

    # Phase 1: every run straight after pruning (no training: the value of compensation).
    for speedup in args.speedups:
        for name in [n for n in runs if n in args.runs or not args.runs]:
            if (name, speedup, 0) in done or (name, speedup) in failed:
                continue
            t0 = time.perf_counter()
            try:
                model, result = pruned(name, speedup)
            except PrunekitError as e:  # e.g. tau leaves the target out of reach: say so in the table
                print(f"{name} {speedup}x: {e}", flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps({"run": name, "speedup_target": speedup, "ft_epochs": 0, "error": str(e),
                                        "command": command}) + "\n")
                continue
            record(name, speedup, result, model, evaluate(model.to(dev), test_loader, dev)["top1"], 0, None, t0)
    # Phase 2: the fine-tune budget, for the targets in --finetune-at.
    for speedup in args.finetune_at:
        for name in [n for n in runs if n in args.runs or not args.runs]:
            first = next((r for r in rows if (r["run"], r["speedup_target"], r["ft_epochs"]) == (name, speedup, 0)
                          and "error" not in r), None)
            if first is None or (name, speedup, args.ft_epochs) in done:
                continue
            t0 = time.perf_counter()
            model, result = pruned(name, speedup)
            ft = TrainConfig(**dict(FT_CFG, epochs=args.ft_epochs, lr=args.ft_lr, seed=args.seed))
            model, _ = fit(model, train_loader, val_loader, ft, device=dev, desc=f"{name} {speedup}x")
            record(name, speedup, result, model, first["top1_pruned"], args.ft_epochs,
                   evaluate(model, test_loader, dev)["top1"], t0)


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lines = ["| target | run | MACs ratio | params | channels stage 1 / merged | top-1 pruned | top-1 fine-tuned "
             "(epochs) | Δ vs base |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["speedup_target"], r["run"], r["ft_epochs"])):
        if "error" in r:
            reach = re.search(r"reach ([\d.]+x)", r["error"])
            why = f"out of reach: τ allows {reach.group(1)}" if reach else r["error"]
            lines.append(f"| {r['speedup_target']}x | {r['run']} | — | — | — | {why} | — | — |")
            continue
        ft = f"{r['top1_finetuned']:.2f} ({r['ft_epochs']})" if r["top1_finetuned"] is not None else "—"
        last = r["top1_finetuned"] if r["top1_finetuned"] is not None else r["top1_pruned"]
        chans = f"{r['stage1_channels']} / {r['stage2_channels']}" if r["stage1_channels"] is not None else "—"
        lines.append(f"| {r['speedup_target']}x | {r['run']} | {r['speedup_macs']:.2f}x | "
                     f"{r['params_after'] / 1e6:.3f}M | {chans} | {r['top1_pruned']:.2f} | {ft} | "
                     f"{last - r['base_top1']:+.2f} |")
    return "\n".join(lines)


def plot(path: Path, png: Path) -> None:
    """Histogram of every channel's best R² after stage 1 (imp-sim's stage-2 candidates) with τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("similarity") and r["ft_epochs"] == 0]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        ax.hist(r["similarity"], bins=40, color="#9bb7d4")
        ax.axvline(r["options"]["tau"], color="crimson", ls="--", label=f"τ = {r['options']['tau']:g}")
        ax.set_title(f"{r['speedup_target']}x: {r['stage2_channels']} merged", fontsize=9)
        ax.set_xlabel("best R² of x_j ≈ a·x_i + b")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--s", type=float, default=1e-2, help="L1 strength on BN γ during the shared sparsity training")
    p.add_argument("--sparsify-epochs", type=int, default=1)
    p.add_argument("--sparsify-lr", type=float, default=0.02)
    p.add_argument("--holdout", type=float, default=0.1, help="share of the training split held out for validation")
    p.add_argument("--variants", type=lambda s: [tuple(float(v) for v in pair.split(":")) for pair in s.split(",")],
                   default=[(0.5, 0.9)], help="imp-sim runs as stage1_share:tau pairs, e.g. 0.5:0.9,0.9:0.9")
    p.add_argument("--runs", type=lambda s: s.split(","), default=[],
                   help="only these runs (names as in the table; default all)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 2.6])
    p.add_argument("--finetune-at", type=lambda s: [float(v) for v in s.split(",") if v], default=[2.0],
                   help="targets whose runs are fine-tuned ('' for none)")
    p.add_argument("--ft-epochs", type=int, default=2, help="reduced from the protocol's 6 to fit 2 CPU cores")
    p.add_argument("--out", default="benchmarks/results/s3-resnet20.jsonl")
    p.add_argument("--plot", nargs=2, metavar=("JSONL", "PNG"), help="only draw the R² histograms")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
    elif args.plot:
        plot(Path(args.plot[0]), Path(args.plot[1]))
    else:
        run(args)


if __name__ == "__main__":
    main()
