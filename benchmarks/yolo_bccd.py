"""S0 / S3 on a detector: yolov8n on BCCD (issues 12 and 13).

Protocol: ``yolov8n`` trained from scratch at imgsz 320 on BCCD's train split (``--base-epochs``,
cached), val split for every model selection, test split only for the table. From that base every
run gets the same post-base budget of ``--budget`` epochs:

- ``adaptive-slim``: sparsity training (L1 on BN γ, ``--sparsify-epochs`` at ``--s``) → learned
  threshold (channels + residual bottlenecks) → ``--round2-epochs`` more sparsity training → second
  learned round (the recurrence) → fine-tune for the rest of the budget;
- ``net-slim``: the same first sparsified checkpoint, global |γ| ranking at adaptive-slim's MACs,
  fine-tune for the rest;
- ``imp-sim``: the same checkpoint, |γ| stage then similarity merging at adaptive-slim's MACs;
- ``l1-norm``: the base itself, group L1 norm at adaptive-slim's MACs, fine-tuned for the whole budget.

Every row: val mAP straight after pruning (the value of what a method keeps), test mAP50 / mAP50-95
after the budget, params, MACs at 320, latency (eager batch 1 and 16, ONNX Runtime batch 1; medians,
same threads). One JSON line per finished run is appended to ``--out``; ``--table`` prints Markdown.

    python benchmarks/yolo_bccd.py --data ../shared/data/bccd --out benchmarks/results/yolo-bccd.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit as pk
from prunekit import yolo
from prunekit.errors import PrunekitError
from prunekit.export import onnx_latency
from prunekit.measure import count_macs, count_params, latency
from prunekit.train import BNSparsity
from prunekit.yolo.data import detection_data, image_batches

RUNS = ("adaptive-slim", "net-slim", "imp-sim", "l1-norm")
SPARSIFY = {"optimizer": "SGD", "lr0": 0.01, "nbs": 16, "warmup_epochs": 0}  # 13 optimiser steps per epoch


def train(model: torch.nn.Module, args, epochs: int, name: str, *, s: float | None = None, keep: str = "best") -> dict:
    hook = BNSparsity(s) if s else None
    extra = SPARSIFY if s else {}
    return yolo.train(model, args.data, epochs=epochs, imgsz=args.imgsz, batch=16, workers=args.workers, seed=0,
                      project=str(Path(args.cache).resolve() / "runs"), name=name, after_backward=hook, keep=keep,
                      deterministic=False,
                      plots=False, **extra)


def cached(path: Path, make) -> torch.nn.Module:
    if path.exists():
        return pk.load(path)
    model = make()
    pk.save(model, path)
    return model


def base_model(args) -> torch.nn.Module:
    def make():
        torch.manual_seed(0)
        model = pk.models.create("ul:yolov8n", num_classes=3, imgsz=args.imgsz)
        train(model, args, args.base_epochs, f"base-e{args.base_epochs}")
        return model
    return cached(Path(args.base or Path(args.cache) / f"yolov8n-bccd-{args.imgsz}-e{args.base_epochs}.pt"), make)


def sparse_model(args, base: torch.nn.Module) -> torch.nn.Module:
    def make():
        model = copy.deepcopy(base)
        train(model, args, args.sparsify_epochs, f"sparse-s{args.s:g}-e{args.sparsify_epochs}", s=args.s, keep="last")
        return model
    return cached(Path(args.cache) / f"sparse-s{args.s:g}-e{args.sparsify_epochs}.pt", make)


def gammas(model: torch.nn.Module) -> dict:
    g = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    return {"n": g.numel(), "median": g.median().item(), "below_1e-2": (g < 1e-2).float().mean().item(),
            "below_1e-1": (g < 1e-1).float().mean().item()}


def cost(model: torch.nn.Module, x: torch.Tensor, args) -> dict:
    one = x[:1]
    with yolo.export_mode(model):
        ort = onnx_latency(model, one, batch_sizes=(1,), repeats=args.repeats, warmup=3, threads=args.threads)
    return {"params": count_params(model), "macs": count_macs(model, one),
            "eager_b1_ms": latency(model, one, repeats=args.repeats, warmup=3, threads=args.threads)["median_ms"],
            "eager_b16_ms": latency(model, x[:16], repeats=max(5, args.repeats // 3), warmup=2,
                                    threads=args.threads)["median_ms"],
            "ort_b1_ms": ort["b1"]["median_ms"]}


def finish(args, name: str, model: torch.nn.Module, x: torch.Tensor, record: dict, ft_epochs: int) -> dict:
    record["val_after_prune"] = yolo.validate(model, args.data, split="val", imgsz=args.imgsz)
    t0 = time.perf_counter()
    if ft_epochs:
        train(model, args, ft_epochs, f"{name}-ft{ft_epochs}")
    pk.save(model, Path(args.cache) / f"{name}-final.pt")
    record |= {"finetune_epochs": ft_epochs, "finetune_s": round(time.perf_counter() - t0, 1),
               "val": yolo.validate(model, args.data, split="val", imgsz=args.imgsz),
               "test": yolo.validate(model, args.data, split="test", imgsz=args.imgsz), **cost(model, x, args)}
    return record


def prune(model: torch.nn.Module, method: str, x: torch.Tensor, calib: list, **kw) -> pk.PruneResult:
    return pk.prune(model, method, x, data=calib, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="../shared/data/bccd", help="BCCD (Pascal VOC directory)")
    ap.add_argument("--out", default="benchmarks/results/yolo-bccd.jsonl")
    ap.add_argument("--cache", default="cache/yolo-bench", help="base, sparse and final models (ignored dir); "
                    "with --latency a comma-separated list")
    ap.add_argument("--base", help="a cached base model file (prunekit format); trained when missing")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--base-epochs", type=int, default=100)
    ap.add_argument("--budget", type=int, default=40, help="post-base epochs of every run")
    ap.add_argument("--sparsify-epochs", type=int, default=15)
    ap.add_argument("--round2-epochs", type=int, default=10, help="adaptive-slim's second sparsity round")
    ap.add_argument("--s", type=float, default=1e-2, help="L1 rate on BN γ (per mean loss)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--imp-sim", default="", metavar="K=V,...", help="imp-sim options, e.g. stage1_share=0.8,tau=0.8")
    ap.add_argument("--speedup", type=float, help="MACs target of the other runs (default: adaptive-slim's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", metavar="JSONL", help="print the Markdown table of a results file and exit")
    ap.add_argument("--latency", metavar="JSON", help="re-measure the cached final models' latency side by side "
                    "(interleaved rounds, medians) into this file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return
    if args.latency:
        remeasure(args, Path(args.latency))
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    runs = args.runs.split(",")
    ds = detection_data(args.data)
    calib = image_batches(ds, "train", imgsz=args.imgsz, batch=16, limit=64)
    x = calib[0][0]
    meta = {"command": shlex.join([sys.executable.split("/")[-1], *sys.argv]), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__, "threads": args.threads}

    done = {json.loads(line)["run"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()

    def write(row: dict) -> None:
        if row["run"] in ("base", "sparse", "adaptive-slim") and row["run"] in done:
            return  # shared rows are written once per results file
        with out.open("a") as f:
            f.write(json.dumps(row | meta) + "\n")
        print(json.dumps({k: row[k] for k in ("run", "macs", "params") if k in row} |
                         {"test": row.get("test")}), flush=True)

    base = base_model(args)
    write({"run": "base", "epochs": args.base_epochs, "val": yolo.validate(base, args.data, imgsz=args.imgsz),
           "test": yolo.validate(base, args.data, split="test", imgsz=args.imgsz), "gammas": gammas(base),
           **cost(base, x, args)})
    sparse = sparse_model(args, base)
    write({"run": "sparse", "epochs": args.sparsify_epochs, "s": args.s, "gammas": gammas(sparse),
           "val": yolo.validate(sparse, args.data, imgsz=args.imgsz)})

    # adaptive-slim: two learned rounds with sparsity training between them, then fine-tuning
    model = copy.deepcopy(sparse)
    r1 = prune(model, "adaptive-slim", x, calib)
    rounds = [{"macs_removed": r1.info["macs_removed"], "blocks": r1.info["blocks_removed"],
               "threshold": r1.info["threshold"], "val": yolo.validate(model, args.data, imgsz=args.imgsz),
               "channel_fit": {k: v for k, v in (r1.info["channel_fit"] or {}).items() if not isinstance(v, list)}}]
    learned = r1.info["macs_removed"] > 0
    if not learned:  # no threshold in the |γ| distribution: adaptive-slim removes nothing, by design
        write({"run": "adaptive-slim", "rounds": rounds, "pruned": False, "speedup": 1.0, "epochs": args.budget,
               "reason": (r1.info["channel_fit"] or {}).get("reason")})
    if learned and args.round2_epochs:
        train(model, args, args.round2_epochs, f"adaptive-r2-s{args.s:g}", s=args.s, keep="last")
        r2 = prune(model, "adaptive-slim", x, calib)
        rounds.append({"macs_removed": r2.info["macs_removed"], "blocks": r2.info["blocks_removed"],
                       "threshold": r2.info["threshold"]})
    target = args.speedup or count_macs(base, x[:1]) / count_macs(model, x[:1])
    spent = args.sparsify_epochs + args.round2_epochs
    if learned and "adaptive-slim" in runs:
        write(finish(args, "adaptive-slim", model, x, {"run": "adaptive-slim", "rounds": rounds,
                                                       "speedup": target, "epochs": args.budget},
                     args.budget - spent))
    imp = {k: float(v) for k, v in (kv.split("=") for kv in args.imp_sim.split(",") if kv)}
    for name, start, opts in (("net-slim", sparse, {}), ("imp-sim", sparse, imp), ("l1-norm", base, {})):
        if name not in runs:
            continue
        model = copy.deepcopy(start)
        try:
            res = prune(model, name, x, calib, speedup=target, **opts)
        except PrunekitError as exc:  # e.g. imp-sim: the similarity threshold cannot reach the target
            write({"run": name, "options": opts, "speedup": target, "error": str(exc)})
            continue
        record = {"run": name, "options": opts, "speedup": target, "epochs": args.budget, "prune_info": {
            k: v for k, v in res.info.items() if isinstance(v, int | float | str)}}
        write(finish(args, name, model, x, record, args.budget - (args.sparsify_epochs if start is sparse else 0)))


def remeasure(args, out: Path, rounds: int = 5) -> None:
    """Latency of the base and every cached final model, measured in interleaved rounds on one machine state,
    so that background load hits every model alike; medians over rounds, ratios against the base."""
    first = Path(args.cache.split(",")[0])
    files = {"base": Path(args.base or first / f"yolov8n-bccd-{args.imgsz}-e{args.base_epochs}.pt")}
    for d in args.cache.split(","):  # several caches: one run each of several protocols
        files |= {f"{Path(d).name}/{p.stem.removesuffix('-final')}": p for p in sorted(Path(d).glob("*-final.pt"))}
    models = {k: pk.load(p) for k, p in files.items()}
    x = image_batches(detection_data(args.data), "train", imgsz=args.imgsz, batch=16, limit=16)[0][0]
    per: dict[str, dict[str, list[float]]] = {k: {"eager_b1_ms": [], "eager_b16_ms": [], "ort_b1_ms": []}
                                              for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            for key, v in cost(m, x, args).items():
                if key in per[k]:
                    per[k][key].append(v)
    med = {k: {key: statistics.median(v) for key, v in d.items()} for k, d in per.items()}
    res = {k: {**med[k], "macs": count_macs(models[k], x[:1]), "params": count_params(models[k]),
               **{f"{key}_ratio": med["base"][key] / med[k][key] for key in med[k]}} for k in models}
    out.write_text(json.dumps({"rounds": rounds, "repeats": args.repeats, "threads": args.threads,
                               "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]), "models": res},
                              indent=1))
    for k, r in res.items():
        print(f"{k:>24}: MACs {r['macs'] / 1e6:.0f}M, eager b1 {r['eager_b1_ms_ratio']:.2f}x, "
              f"b16 {r['eager_b16_ms_ratio']:.2f}x, ORT b1 {r['ort_b1_ms_ratio']:.2f}x")


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = next(r for r in rows if r["run"] == "base")
    out = ["| run | test mAP50 | test mAP50-95 | val mAP50 after prune | params | MACs | MACs ratio | "
           "eager b1 | eager b16 | ORT b1 | epochs |", "|" + "---|" * 11]
    for r in rows:
        if "test" not in r or "macs" not in r:
            continue
        after = r.get("val_after_prune", {}).get("mAP50")
        out.append(f"| {r['run']} | {100 * r['test']['mAP50']:.1f} | {100 * r['test']['mAP50-95']:.1f} | "
                   f"{'' if after is None else f'{100 * after:.1f}'} | {r['params'] / 1e6:.2f}M | "
                   f"{r['macs'] / 1e6:.0f}M | {base['macs'] / r['macs']:.2f}x | "
                   f"{base['eager_b1_ms'] / r['eager_b1_ms']:.2f}x | {base['eager_b16_ms'] / r['eager_b16_ms']:.2f}x | "
                   f"{base['ort_b1_ms'] / r['ort_b1_ms']:.2f}x | {r['epochs']} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
