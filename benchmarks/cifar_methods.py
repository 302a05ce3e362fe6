"""Side-by-side comparison of pruning methods on CIFAR-10 (SPEC §6, CPU protocol v1).

Every method starts from the *same* cached base checkpoint and gets the *same* fine-tune budget.
One JSON line per (method, speedup) is appended to --out as soon as it finishes, so a crash
loses only the run in progress; ``--table`` renders the Markdown table from that file.

    python benchmarks/cifar_methods.py --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --model resnet20 --methods dist-fit,l1-norm,fpgm,random --speedups 2.0,2.6 \\
        --out benchmarks/results/s1-resnet20.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import prunekit as pk
from prunekit.measure import measure
from prunekit.train import TrainConfig, evaluate, fit, resolve_device

BASE_CFG = dict(epochs=12, lr=0.2, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                schedule="onecycle", warmup=0.25, label_smoothing=0.1, batch_size=128)
FT_CFG = dict(BASE_CFG, epochs=6, lr=0.05)


def cached(path: Path, train: Callable[[], tuple[torch.nn.Module, dict]]) -> tuple[torch.nn.Module, dict]:
    """A checkpoint trained once by ``train`` and kept at ``path`` (its facts in ``path.json``), so that every
    run of every benchmark that names it starts from the same weights."""
    meta_path = path.with_suffix(".json")
    if path.exists():
        return pk.load(path), json.loads(meta_path.read_text())
    model, meta = train()
    pk.save(model, path)
    meta_path.write_text(json.dumps(meta))
    return model, meta


def base_model(args, bundle, train_loader, test_loader, dev) -> tuple[torch.nn.Module, dict]:
    """Train the protocol's base once and cache it, so every method starts from the same weights."""
    path = Path(args.cache) / f"{args.model}-e{args.base_epochs}-s{args.base_seed}.pt"

    def train() -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(args.base_seed)
        model = pk.models.create(args.model, num_classes=bundle.num_classes)
        model.prunekit_arch["input_shape"] = list(bundle.input_shape)
        t0 = time.perf_counter()
        cfg = TrainConfig(**dict(BASE_CFG, epochs=args.base_epochs, seed=args.base_seed))
        model, res = fit(model, train_loader, test_loader, cfg, device=dev, run_dir=path.parent / f"{path.stem}-run",
                         resume=True, desc=f"base {args.model}")
        return model, {"top1": res.final["val_top1"], "epochs": args.base_epochs, "wall_s": time.perf_counter() - t0,
                       "config": BASE_CFG | {"epochs": args.base_epochs}}

    return cached(path, train)


def run(args) -> None:
    dev = resolve_device(args.device)
    bundle = pk.data.load("cifar10", args.data_root, limit=args.limit)
    train_loader, test_loader = bundle.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.seed)
    base, base_meta = base_model(args, bundle, train_loader, test_loader, dev)
    x = torch.zeros(1, *bundle.input_shape)
    base_cost = measure(base.cpu(), x, repeats=args.repeats, threads=args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["speedup_target"]) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    for speedup in args.speedups:
        for method in args.methods:
            if (method, speedup) in done:
                continue
            t0 = time.perf_counter()
            model = copy.deepcopy(base).cpu()
            result = pk.prune(model, method, x, speedup=speedup, seed=args.seed)
            top1_pruned = evaluate(model.to(dev), test_loader, dev)["top1"]
            ft = TrainConfig(**dict(FT_CFG, epochs=args.ft_epochs, lr=args.ft_lr, seed=args.seed))
            model, res = fit(model, train_loader, test_loader, ft, device=dev, desc=f"{method} {speedup}x")
            cost = measure(model.cpu(), x, repeats=args.repeats, threads=args.threads)
            lat = {b: (base_cost["latency"][b]["median_ms"], cost["latency"][b]["median_ms"])
                   for b in cost["latency"]}
            row = {
                "method": method, "model": args.model, "dataset": "cifar10 (shared jpeg copy)",
                "speedup_target": speedup, "speedup_macs": result.speedup,
                "base_top1": base_meta["top1"], "top1_pruned": top1_pruned, "top1_finetuned": res.final["val_top1"],
                "params_before": base_cost["params"], "params_after": cost["params"],
                "macs_before": base_cost["macs"], "macs_after": cost["macs"],
                "latency_ms_before_after": lat, "latency_device": "cpu", "latency_threads": args.threads,
                "epochs": {"base": base_meta["epochs"], "finetune": args.ft_epochs}, "seed": args.seed,
                "base_seed": args.base_seed,
                "train_device": str(dev), "host": platform.node(),
                "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                "wall_s": round(time.perf_counter() - t0, 1),
                "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            }
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method:>10} {speedup}x: {result.speedup:.2f}x MACs, top1 {top1_pruned:.2f} -> "
                  f"{row['top1_finetuned']:.2f} (base {base_meta['top1']:.2f})", flush=True)


def summary(paths: list[Path]) -> str:
    """Mean ± std over runs (seeds) per method and target, from several JSONL files."""
    import statistics

    rows = [json.loads(x) for p in paths for x in p.read_text().splitlines()]
    keys = sorted({(r["speedup_target"], r["method"]) for r in rows})
    lines = ["| target | method | runs | top-1 pruned | top-1 fine-tuned | Δ vs own base |",
             "|---|---|---|---|---|---|"]

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    for sp, m in keys:
        rs = [r for r in rows if (r["speedup_target"], r["method"]) == (sp, m)]
        lines.append(f"| {sp}x | {m} | {len(rs)} | {ms([r['top1_pruned'] for r in rs])} | "
                     f"{ms([r['top1_finetuned'] for r in rs])} | "
                     f"{ms([r['top1_finetuned'] - r['base_top1'] for r in rs])} |")
    return "\n".join(lines)


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    head = ("| method | target | MACs ratio | params | top-1 pruned | top-1 fine-tuned | Δ vs base | "
            "latency b64 ratio (CPU) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["speedup_target"], -r["top1_finetuned"])):
        b, a = r["latency_ms_before_after"]["b64"]
        lines.append(f"| {r['method']} | {r['speedup_target']}x | {r['speedup_macs']:.2f}x | "
                     f"{r['params_before'] / 1e6:.3f}M → {r['params_after'] / 1e6:.3f}M | {r['top1_pruned']:.2f} | "
                     f"{r['top1_finetuned']:.2f} | {r['top1_finetuned'] - r['base_top1']:+.2f} | {b / a:.2f}x |")
    return "\n".join(lines)


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The arguments every CPU-protocol benchmark shares: data, the cached base (``base_model``), seeds, timing."""
    p.add_argument("--data-root")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--base-epochs", type=int, default=BASE_CFG["epochs"])
    p.add_argument("--base-seed", type=int, default=0, help="seed of the cached base model")
    p.add_argument("--ft-lr", type=float, default=FT_CFG["lr"])
    p.add_argument("--seed", type=int, default=0, help="seed of pruning (random) and fine-tuning")
    p.add_argument("--limit", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for latency")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cache", default="cache/bases")
    p.add_argument("--table", help="only print the Markdown table of this JSONL file")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--methods", type=lambda s: s.split(","), default=["dist-fit", "l1-norm", "fpgm", "random"])
    p.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[2.0])
    p.add_argument("--ft-epochs", type=int, default=FT_CFG["epochs"])
    p.add_argument("--out", default="benchmarks/results/methods.jsonl")
    p.add_argument("--summary", nargs="+", help="only print mean ± std over these JSONL files")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    if args.summary:
        print(summary([Path(x) for x in args.summary]))
        return
    run(args)


if __name__ == "__main__":
    main()
