"""``prunekit demo``: the whole job in about a minute on the bundled digits data.

Trains a small CNN on scikit-learn's digits (no download), prunes it physically to half the
MACs, fine-tunes it briefly, and prints what that bought and what it cost, measured.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from . import data, io, models
from .measure import measure
from .methods import prune
from .train import TrainConfig, evaluate, fit, resolve_device

METHOD = "l1-norm"
SPEEDUP = 2.0


def _row(model: torch.nn.Module, loader, x: torch.Tensor) -> dict:
    stats = measure(model.cpu(), x, repeats=50, warmup=10, threads=1)
    return {"top1": evaluate(model, loader, "cpu")["top1"], "params": stats["params"], "macs": stats["macs"],
            "lat_b1": stats["latency"]["b1"]["median_ms"], "lat_b64": stats["latency"]["b64"]["median_ms"]}


def format_table(rows: dict[str, dict]) -> str:
    """Before/after table; latencies are medians at 1 thread."""
    cols = list(rows)
    lines = [f"{'':<22}" + "".join(f"{c:>18}" for c in cols)]
    spec = [("top-1 accuracy (%)", "top1", "{:.2f}"), ("parameters", "params", "{:,}"),
            ("MACs", "macs", "{:,}"), ("latency b1 (ms)", "lat_b1", "{:.3f}"),
            ("latency b64 (ms)", "lat_b64", "{:.3f}")]
    for label, key, fmt in spec:
        lines.append(f"{label:<22}" + "".join(f"{fmt.format(rows[c][key]):>18}" for c in cols))
    return "\n".join(lines)


def run_demo(out: Path | None = None, device: str = "auto") -> int:
    t0 = time.perf_counter()
    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    dev = resolve_device(device)
    bundle = data.load("digits")
    model = models.create("digits_cnn", num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    model.prunekit_arch["input_shape"] = list(bundle.input_shape)
    train_loader, test_loader = bundle.loaders(batch_size=64, device=dev)
    x = data.example_inputs(bundle)
    print(f"[1/3] training digits_cnn on scikit-learn digits ({bundle.train.labels.numel()} images)")
    base_cfg = TrainConfig(epochs=15, lr=0.1, batch_size=64, label_smoothing=0.0, weight_decay=5e-4)
    model, _ = fit(model, train_loader, test_loader, base_cfg, device=dev, run_dir=out / "base", desc="train")
    rows = {"base": _row(model, test_loader, x)}
    io.save(model, out / "base.pt")

    print(f"[2/3] pruning with {METHOD} to {SPEEDUP:g}x fewer MACs (physical channel removal)")
    pruned = copy.deepcopy(model).cpu()
    result = prune(pruned, METHOD, x, speedup=SPEEDUP)
    rows[f"{METHOD} pruned"] = _row(pruned, test_loader, x)

    print("[3/3] fine-tuning the pruned model")
    ft_cfg = TrainConfig(epochs=6, lr=0.05, batch_size=64, label_smoothing=0.0, weight_decay=5e-4)
    pruned, _ = fit(pruned, train_loader, test_loader, ft_cfg, device=dev, run_dir=out / "finetune",
                    desc="finetune")
    rows["+ fine-tuned"] = _row(pruned, test_loader, x)
    io.save(pruned, out / "pruned.pt", prune=result.to_dict())
    (out / "summary.json").write_text(json.dumps({"rows": rows, "prune": result.to_dict()}, indent=2))

    print()
    print(format_table(rows))
    print(f"\n{result.summary()}")
    print(f"models and logs in {out}  ({time.perf_counter() - t0:.0f} s)")
    return 0
