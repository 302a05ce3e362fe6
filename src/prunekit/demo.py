"""``prunekit demo``: the whole job in about a minute on the bundled digits data.

Trains a small CNN on scikit-learn's digits (no download), then runs two pruning pipelines side
by side from that same base (prune to half the MACs, fine-tune briefly), prints what each bought
and what it cost, measured, and writes an HTML/Markdown report comparing them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import io, timing
from .compare import final_model_path
from .pipeline import run
from .report import write_report

METHODS = ("l1-norm", "dist-fit")
SPEEDUP = 2.0
DATA = {"name": "digits", "batch_size": 64}


def format_table(base: dict, runs: dict[str, dict], speed: dict[str, dict] | None = None) -> str:
    """Before/after table; speedups measured side by side (``prunekit.timing``), 'within noise' where they are."""
    cols = {"base": base, **runs}
    lines = [f"{'':<22}" + "".join(f"{c:>26}" for c in cols)]
    spec = [("top-1 accuracy (%)", "top1", "{:.2f}"), ("parameters", "params", "{:,}"), ("MACs", "macs", "{:,}")]
    for label, key, fmt in spec:
        lines.append(f"{label:<22}" + "".join(f"{fmt.format(cols[c][key]):>26}" for c in cols))
    for key, stats in (speed or {}).items():
        lines.append(f"{'speedup ' + key:<22}" + f"{'1.00x':>26}" + "".join(
            f"{timing.label(stats[c]['ratio']):>26}" for c in runs))
    return "\n".join(lines)


def run_demo(out: Path | None = None, device: str = "auto") -> int:
    t0 = time.perf_counter()
    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"[1/3] training digits_cnn on scikit-learn digits -> {out / 'base'}")
    base_cfg = {"name": "base", "model": {"name": "digits_cnn"}, "data": DATA, "device": device,
                "out": str(out / "base"),
                "stages": [{"stage": "train", "epochs": 15, "lr": 0.1, "label_smoothing": 0.0}]}
    base = run(base_cfg)["after"]
    results, dirs = {}, []
    for i, method in enumerate(METHODS, start=2):
        print(f"[{i}/3] {method}: prune to {SPEEDUP:g}x fewer MACs (physical channel removal), fine-tune")
        cfg = {"name": method, "model": {"checkpoint": str(out / "base" / "stages" / "01-train" / "model.pt")},
               "data": DATA, "method": {"name": method}, "target": {"speedup": SPEEDUP}, "device": device,
               "out": str(out / method),
               "stages": [{"stage": "prune"},
                          {"stage": "finetune", "epochs": 6, "lr": 0.05, "label_smoothing": 0.0}]}
        results[method] = run(cfg)["after"]
        dirs.append(out / method)
    html_path, md_path = write_report(dirs, out / "report")
    models = {"base": io.load(out / "base" / "stages" / "01-train" / "model.pt")}
    models |= {m: io.load(final_model_path(out / m)) for m in METHODS}
    speed = timing.side_by_side(models, torch.zeros(1, 1, 8, 8), batch_sizes=(1, 64), runtimes=("eager",),
                                threads=1, rounds=15)
    print()
    print(format_table(base, results, speed))
    print("speedup: base time / pruned time, median (interquartile range) of 15 interleaved rounds, 1 thread")
    print(f"\nreport: {html_path} (also {md_path})  ({time.perf_counter() - t0:.0f} s)")
    return 0
