"""S4 magnitude on GoogLeNet / CIFAR-10: iterative threshold pruning vs. a dense fine-tune (SPEC §4 S4).

Protocol. One cached base (``cache/bases``) is pruned to 50 → 75 → 87.5 → 93.75 % of its conv/FC
weights with ``--step-epochs`` of masked retraining after each step; a dense fine-tune of the same
base gets the same total epoch budget as the reference. Every step reports top-1 right after
pruning and after retraining, non-zero parameters, the dense fp32 / sparse / sparse+gzip file
sizes (fp32 and fp16 values), the ideal sparse MACs, and CPU latency of the masked dense model
beside torch.sparse CSR paths (linear only, conv+linear). One JSON line per step is appended to
--out with the command; a killed run resumes from the last finished step's checkpoint.

CPU protocol (reduced cost, documented): ``googlenet`` with ``--width-mult 0.5 --stem-stride 2``
(1.55 M params, 95 M MACs instead of 6.16 M / 1.52 G). The paper's full-size setting is
``--width-mult 1 --stem-stride 1`` on a GPU.

    python benchmarks/magnitude_googlenet.py --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --out benchmarks/results/s4-googlenet-cpu.jsonl
    python benchmarks/magnitude_googlenet.py --table benchmarks/results/s4-googlenet-cpu.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from protocol import BASE_CFG, cached
from torch import nn

import prunekit as pk
from prunekit.masks import Masks
from prunekit.measure import count_params
from prunekit.methods.magnitude import conv_linear_macs, iterative_prune
from prunekit.sparse import export_sparse, sparse_latency
from prunekit.train import TrainConfig, evaluate, fit, resolve_device

STEP_CFG = dict(BASE_CFG, epochs=2, lr=0.05)


def model_kwargs(args) -> dict:
    return {"width_mult": args.width_mult, "stem_stride": args.stem_stride}


def tag(args) -> str:
    subset = f"-l{args.limit}" if args.limit else ""  # a smoke-test base must never pass for a full one
    return f"googlenet-w{args.width_mult:g}-ss{args.stem_stride}-e{args.base_epochs}-s{args.base_seed}{subset}"


def base_model(args, bundle, train_loader, test_loader, dev) -> tuple[nn.Module, dict]:
    """Train the base once and cache it, so the pruned and the dense runs start from the same weights."""
    path = Path(args.cache) / f"{tag(args)}.pt"

    def train() -> tuple[nn.Module, dict]:
        torch.manual_seed(args.base_seed)
        model = pk.models.create("googlenet", num_classes=bundle.num_classes, **model_kwargs(args))
        model.prunekit_arch["input_shape"] = list(bundle.input_shape)
        t0 = time.perf_counter()
        cfg = TrainConfig(**dict(BASE_CFG, epochs=args.base_epochs, seed=args.base_seed))
        model, res = fit(model, train_loader, test_loader, cfg, device=dev, run_dir=path.parent / f"{path.stem}-run",
                         resume=True, desc="base googlenet")
        return model, {"top1": res.final["val_top1"], "epochs": args.base_epochs, "wall_s": time.perf_counter() - t0,
                       "config": BASE_CFG | {"epochs": args.base_epochs}, "model_kwargs": model_kwargs(args)}

    return cached(path, train)


def costs(model: nn.Module, x: torch.Tensor, run_dir: Path, name: str, args) -> dict:
    """File sizes (fp32/fp16 values, with and without gzip) and latency of a CPU copy of ``model``."""
    cpu = copy.deepcopy(model).cpu().eval()
    sizes = {v: export_sparse(cpu, run_dir / f"{name}-{v}.spk", values=v) for v in ("fp32", "fp16")}
    macs, macs_nonzero = conv_linear_macs(cpu, x)
    lat = {}
    for b in args.latency_batches:
        xb = x.expand(b, *x.shape[1:]).contiguous()
        lat[f"b{b}"] = {k: {"median_ms": v["median_ms"], **({"max_abs_diff": v["max_abs_diff"]}
                                                               if "max_abs_diff" in v else {})}
                        for k, v in sparse_latency(cpu, xb, repeats=args.repeats, threads=args.threads).items()}
    return {"params": count_params(cpu), "nonzero_params": count_params(cpu, nonzero=True), "macs": macs,
            "sparse_macs": macs_nonzero,
            "bytes": {"dense_fp32": sizes["fp32"]["dense_bytes"],
                      **{f"sparse_{v}": s["sparse_bytes"] for v, s in sizes.items()},
                      **{f"sparse_{v}_gzip": s["sparse_gzip_bytes"] for v, s in sizes.items()}},
            "padding_entries": sizes["fp32"]["padding"], "latency_ms": lat}


def common(args, base_meta, dev) -> dict:
    return {"model": "googlenet", "model_kwargs": model_kwargs(args), "dataset": "cifar10 (shared jpeg copy)",
            "limit": args.limit, "base_top1": base_meta["top1"], "seed": args.seed, "base_seed": args.base_seed,
            "latency_device": "cpu", "latency_threads": args.threads, "train_device": str(dev),
            "host": platform.node(), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}


def append(out: Path, row: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def run(args) -> None:
    dev = resolve_device(args.device)
    bundle = pk.data.load("cifar10", args.data_root, limit=args.limit)
    train_loader, test_loader = bundle.loaders(batch_size=BASE_CFG["batch_size"], device=dev, seed=args.seed)
    base, base_meta = base_model(args, bundle, train_loader, test_loader, dev)
    x = torch.zeros(1, *bundle.input_shape)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = f"{len(args.schedule)}to{args.schedule[-1]:g}"  # resuming under another schedule must not reuse steps
    name = f"{tag(args)}-{args.rule}-{steps}-se{args.step_epochs}-lr{args.step_lr:g}-s{args.seed}"
    run_dir = Path(args.cache).parent / "magnitude" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in out.read_text().splitlines()] if out.exists() else []
    mine = [r for r in rows if r.get("run") == run_dir.name]
    step_cfg = dict(STEP_CFG, epochs=args.step_epochs, lr=args.step_lr, seed=args.seed)
    budget = args.step_epochs * len(args.schedule)

    ft_run = f"{tag(args)}-ft{budget}-s{args.seed}"  # the dense reference does not depend on the rule
    if not any(r.get("run") == ft_run for r in rows):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        model, res = fit(model, train_loader, test_loader, TrainConfig(**dict(step_cfg, epochs=budget)), device=dev,
                         desc="dense fine-tune")
        append(out, {"method": "dense-finetune", "run": ft_run, "top1": res.final["val_top1"],
                     "epochs": {"base": base_meta["epochs"], "finetune": budget},
                     **costs(model, x, run_dir, "dense", args), **common(args, base_meta, dev),
                     "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"dense fine-tune ({budget} epochs): top1 {res.final['val_top1']:.2f}", flush=True)

    done = sorted(r["step"] for r in mine if r["method"] == "magnitude")
    model = pk.load(run_dir / f"step{done[-1]}.pt") if done else copy.deepcopy(base)
    model.to(dev)  # before the masks are attached: their hooks live on the parameters' device
    first = len(done)
    t0 = time.perf_counter()

    def retrain(m: nn.Module, masks: Masks, i: int) -> dict:
        nonlocal t0
        step = first + i
        top1_pruned = evaluate(m, test_loader, dev)["top1"]
        m, res = fit(m, train_loader, test_loader, TrainConfig(**step_cfg), device=dev,
                     after_step=masks.after_step, desc=f"magnitude step {step}")
        pk.save(m, run_dir / f"step{step}.pt")
        row = {"method": "magnitude", "run": run_dir.name, "rule": args.rule, "step": step,
               "sparsity_target": args.schedule[step], "sparsity": masks.sparsity(), "top1_pruned": top1_pruned,
               "top1_retrained": res.final["val_top1"],
               "epochs": {"base": base_meta["epochs"], "per_step": args.step_epochs, "so_far": (step + 1) *
                          args.step_epochs, "dense_finetune": budget},
               **costs(m, x, run_dir, f"step{step}", args), **common(args, base_meta, dev),
               "wall_s": round(time.perf_counter() - t0, 1)}
        row["compression"] = row["params"] / max(row["nonzero_params"], 1)
        append(out, row)
        print(f"step {step}: sparsity {row['sparsity']:.4f}, non-zero {row['nonzero_params'] / 1e6:.3f}M "
              f"({row['compression']:.1f}x), top1 {top1_pruned:.2f} -> {row['top1_retrained']:.2f} "
              f"(base {base_meta['top1']:.2f})", flush=True)
        t0 = time.perf_counter()
        return {"top1_pruned": top1_pruned, "top1_retrained": row["top1_retrained"]}

    iterative_prune(model, x.to(dev), schedule=args.schedule[first:], retrain=retrain, rule=args.rule, q=args.q)


def table(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    lines = ["| run | step | sparsity | non-zero params | top-1 pruned | top-1 retrained | dense fp32 | "
             "sparse fp16 | +gzip | latency b1 dense / CSR conv+FC (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"].get("b1", next(iter(r["latency_ms"].values())))
        step = r.get("step", "dense FT")
        pruned = f"{r['top1_pruned']:.2f}" if "top1_pruned" in r else "–"
        lines.append(f"| {r['run']} | {step} | {r.get('sparsity', 0.0):.4f} | {r['nonzero_params'] / 1e6:.3f}M "
                     f"| {pruned} | {r.get('top1_retrained', r.get('top1')):.2f} | "
                     f"{r['bytes']['dense_fp32'] / 1e6:.2f} MB | {r['bytes']['sparse_fp16'] / 1e6:.2f} MB | "
                     f"{r['bytes']['sparse_fp16_gzip'] / 1e6:.2f} MB | {lat['dense']['median_ms']:.1f} / "
                     f"{lat['sparse_conv_linear']['median_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root")
    p.add_argument("--width-mult", type=float, default=0.5)
    p.add_argument("--stem-stride", type=int, default=2, choices=(1, 2))
    p.add_argument("--schedule", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 0.75, 0.875, 0.9375])
    p.add_argument("--rule", default="global", choices=("global", "layer-std"))
    p.add_argument("--q", type=float, default=1.0, help="layer-std: q of t_l = q·σ_l (scaled to each target)")
    p.add_argument("--base-epochs", type=int, default=BASE_CFG["epochs"])
    p.add_argument("--step-epochs", type=int, default=STEP_CFG["epochs"], help="retraining epochs per step")
    p.add_argument("--step-lr", type=float, default=STEP_CFG["lr"])
    p.add_argument("--seed", type=int, default=0, help="seed of retraining and the dense fine-tune")
    p.add_argument("--base-seed", type=int, default=0, help="seed of the cached base model")
    p.add_argument("--limit", type=int, help="class-stratified subset per split (smoke tests)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for latency")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--latency-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--cache", default="cache/bases")
    p.add_argument("--out", default="benchmarks/results/s4-googlenet.jsonl")
    p.add_argument("--table", help="only print the Markdown table of this JSONL file")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    run(args)


if __name__ == "__main__":
    main()
