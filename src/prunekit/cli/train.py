"""``prunekit train`` and ``prunekit finetune``: a training run in a directory that is never overwritten."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import data as pkdata
from .. import distill, io, models, tasks
from ..errors import PrunekitError
from ..graph import run_checked
from ..masks import Masks
from ..train import TrainConfig, dist_info, fit, resolve_device
from .inputs import _load_data


def _train_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, schedule=args.schedule,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                       batch_size=args.batch_size or 128, seed=args.seed)


def _guard_out(out: Path, args: argparse.Namespace) -> None:
    """Never overwrite a run: a finished or interrupted one is resumed (--resume) or replaced (--force) only."""
    if args.resume and args.force:
        raise PrunekitError("--resume continues a run and --force replaces it: give one of them")
    if args.resume and (out / "model.pt").exists():
        raise PrunekitError(f"{out} holds a finished run (model.pt), nothing to resume; use --force to train it "
                            "again or another --out")
    if args.resume and not (out / "last.pt").exists():
        raise PrunekitError(f"{out} holds no interrupted run to resume (no last.pt); drop --resume to start one")
    if args.force and not args.resume:
        for name in ("model.pt", "last.pt", "log.jsonl"):
            (out / name).unlink(missing_ok=True)
        return
    if (out / "model.pt").exists() and not args.resume:
        raise PrunekitError(f"{out} already holds a finished run; use --resume, --force or another --out")
    if (out / "last.pt").exists() and not args.resume:
        raise PrunekitError(f"{out} holds an interrupted run; continue it with --resume, or use --force to start "
                            "over or another --out")


def _run_training(model: torch.nn.Module, args: argparse.Namespace, bundle: pkdata.DataBundle,
                  desc: str) -> int:
    if not str(args.out).strip():
        raise PrunekitError("--out is empty: give a folder for the run")
    out = Path(args.out)
    cfg = _train_cfg(args)
    dev = resolve_device(args.device)
    run_checked(model, pkdata.example_inputs(bundle, batch=1), f"checking the model against data {bundle.name}")
    if dist_info()[0] != 0:
        return _train_loop(model, args, bundle, desc, out, cfg, dev)
    with io.run_lock(out):
        _guard_out(out, args)
        return _train_loop(model, args, bundle, desc, out, cfg, dev)


def _train_loop(model: torch.nn.Module, args: argparse.Namespace, bundle: pkdata.DataBundle, desc: str, out: Path,
                cfg: TrainConfig, dev: torch.device) -> int:
    train_loader, test_loader = bundle.loaders(batch_size=cfg.batch_size, device=dev, seed=cfg.seed,
                                               **_dist_kwargs())
    masks = None
    if getattr(args, "keep_zeros", False):  # unstructured pruning: zeros stay zero through the fine-tune
        masks = Masks.from_zeros(model.to(dev))
        masks.attach(model)
    distiller = getattr(args, "distiller", None)
    model, result = fit(model, train_loader, test_loader, cfg, device=dev, run_dir=out, resume=args.resume,
                        desc=desc, after_step=masks.after_step if masks is not None else None,
                        distill=distiller.to(dev) if distiller is not None else None)
    if dist_info()[0] == 0:
        io.save(model, out / "model.pt", data=bundle.name)
        print(json.dumps({"out": str(out / "model.pt"), **result.final}))
    return 0


def _dist_kwargs() -> dict[str, int]:
    rank, world = dist_info()
    return {"rank": rank, "world_size": world}


def cmd_train(args: argparse.Namespace) -> int:
    bundle = _load_data(args)
    torch.manual_seed(args.seed)  # the initial weights are part of the run's reproducible state
    model = models.create(args.model, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    model.prunekit_arch["input_shape"] = list(bundle.input_shape)
    return _run_training(model, args, bundle, "train")


def cmd_finetune(args: argparse.Namespace) -> int:
    model = io.load(args.checkpoint)
    own = tasks.for_model(model).cli_finetune  # a task with a trainer of its own
    if own is not None:
        return own(args, model)
    bundle = _load_data(args)
    classes = (getattr(model, "prunekit_arch", None) or {}).get("num_classes")
    if classes is not None and classes != bundle.num_classes:
        raise PrunekitError(f"{args.checkpoint} predicts {classes} classes but data {bundle.name} has "
                            f"{bundle.num_classes}; fine-tune it on data with the classes it was trained on")
    if args.distill:
        spec = distill.check({"teacher": args.distill, "alpha": args.alpha, "temperature": args.temperature},
                             "--distill")
        args.distiller = distill.Distiller(io.load(spec["teacher"]), spec["alpha"], spec["temperature"])
        args.distiller.check_against(model, pkdata.example_inputs(bundle), "--distill")
    return _run_training(model, args, bundle, "finetune")
