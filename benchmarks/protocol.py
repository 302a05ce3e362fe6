"""The CIFAR-10 CPU protocol v1 (SPEC §6), shared by the two benchmarks ``prunekit compare`` cannot express: the
base's and the fine-tune's training settings, the base trained once and cached, and the command-line arguments.

Used by ``auto_mend_resnet20.py`` (random search against evolution, Kendall τ of the search's score) and
``magnitude_googlenet.py`` (S4's sparse storage). The method comparisons themselves are ``prunekit compare``
configs under ``benchmarks/compare/`` (issue 20).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import prunekit as pk
from prunekit.train import TrainConfig, fit

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

