"""Classification as a task (``prunekit.tasks``): image folders and bundled sets, top-1, prunekit's ``fit``.

The held-out validation split is a seeded, class-stratified share of the *training* split
(``data.val_fraction``); training stages select on it, methods score on it, and the test split is
touched only for the final table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import data as pkdata
from .. import distill, models
from ..errors import PrunekitError, config_error
from ..measure import hooked
from ..train import TrainConfig, dist_info, fit, total_steps
from . import Aids, Task, TaskData

VAL_FRACTION = 0.1


class Classification(Task):
    """Cross-entropy (with label smoothing in training) and top-1 accuracy in %."""

    name = "classify"
    metric = "top1"
    fractional_epochs = True  # fit counts steps
    metric_label = "top-1 (%)"
    data_hint = "digits, cifar10, synthetic or an ImageFolder path"
    train_keys = frozenset(f.name for f in fields(TrainConfig))

    # ---- metric ----
    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=label_smoothing)

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-batch count behind the training metric shown while training (correct predictions)."""
        return (out.argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
        """Top-1 accuracy and mean cross-entropy; sums across ranks under DDP; restores the model's mode."""
        correct = torch.zeros((), dtype=torch.float64, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        n = torch.zeros((), dtype=torch.float64, device=device)
        with hooked(model):
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    out = model(x)
                loss += F.cross_entropy(out.float(), y, reduction="sum").double()
                correct += (out.argmax(1) == y).sum()
                n += y.numel()
        if dist.is_initialized():
            for t in (correct, loss, n):
                dist.all_reduce(t)
        total = max(n.item(), 1.0)
        return {"top1": 100.0 * correct.item() / total, "loss": loss.item() / total, "n": int(n.item())}

    def score(self, model: nn.Module, data: TaskData, split: str, device: torch.device) -> float:
        return self.evaluate(model.to(device), getattr(data, split), device)[self.metric]

    # ---- data ----
    def load_data(self, spec: dict, *, seed: int, split_seed: int, device: torch.device) -> TaskData:
        bundle = pkdata.load(spec["name"], spec.get("root"), image_size=spec.get("image_size"), limit=spec.get("limit"),
                             download=bool(spec.get("download")), seed=split_seed)
        bundle = bundle.holdout(spec.get("val_fraction", VAL_FRACTION), seed=split_seed)
        rank, world = dist_info()
        bs = spec.get("batch_size", self.default_batch)
        train, _ = bundle.loaders(batch_size=bs, device=device, seed=seed, rank=rank, world_size=world)
        # calibration: un-augmented training batches in a fixed, seeded order (methods take the first n)
        calib = bundle.eval_loader(bundle.train, bs, device, shuffle=True, seed=seed)
        sizes = {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)}
        return TaskData(train=train, val=bundle.eval_loader(bundle.val, 256, device, rank=rank, world_size=world),
                        test=bundle.eval_loader(bundle.test, 256, device),
                        calib=_First(calib, spec.get("calibration_batches", 64)),
                        x=pkdata.example_inputs(bundle, seed=seed), sizes=sizes,
                        record={"val_fraction": spec.get("val_fraction", VAL_FRACTION), "seed": split_seed, **sizes,
                                "val_indices": bundle.val_indices.tolist()},
                        batch_size=bs, source=bundle)

    def cli_data_spec(self, args: Any, model: nn.Module) -> dict:
        spec = {"name": args.data, "root": args.data_root, "image_size": args.image_size, "limit": args.limit,
                "download": args.download, "calibration_batches": args.calibration_batches}
        return {k: v for k, v in spec.items() if v is not None}

    # ---- models ----
    def create_model(self, spec: dict, data: TaskData, seed: int) -> nn.Module:
        bundle = data.source
        if spec.get("trust_pickle") is not None:
            raise config_error("model.trust_pickle", "it is for Ultralytics checkpoints (model.name: "
                               "ul:path/to/best.pt)")
        torch.manual_seed(seed)
        model = models.create(spec["name"], num_classes=spec.get("num_classes") or bundle.num_classes,
                              **({"in_channels": bundle.input_shape[0]} | spec.get("kwargs", {})))
        model.prunekit_arch["input_shape"] = list(bundle.input_shape)
        return model

    def check_model(self, model: nn.Module, data: TaskData, source: str) -> None:
        classes = (getattr(model, "prunekit_arch", None) or {}).get("num_classes")
        if classes is not None and classes != data.source.num_classes:
            raise PrunekitError(f"{source} has {classes} classes but data {data.source.name} has "
                                f"{data.source.num_classes}; use a matching checkpoint")

    # ---- training ----
    def check_stage(self, stage: dict, where: str) -> None:
        settings = {k: v for k, v in stage.items() if k in self.train_keys}
        if settings.get("epochs") == "rest":
            settings["epochs"] = 0
        try:
            TrainConfig.from_dict(settings)
        except PrunekitError as exc:
            raise config_error(where, str(exc)) from exc

    def stage_epochs(self, stage: dict) -> int | str:
        return stage.get("epochs", TrainConfig.epochs)

    def train_stage(self, model: nn.Module, stage: dict, data: TaskData, *, kind: str, epochs: int, sdir: Path,
                    aids: Aids, seed: int, device: torch.device, log: Path,
                    desc: str) -> tuple[nn.Module, float | None]:
        settings = {k: v for k, v in stage.items() if k in self.train_keys} | {"epochs": epochs}
        settings.setdefault("batch_size", data.batch_size)
        settings.setdefault("seed", seed)
        cfg = TrainConfig.from_dict(settings)
        hook = aids.hook(model, total_steps(cfg.epochs, len(data.train)))
        distiller = None
        if aids.teacher is not None:
            net, spec = aids.teacher
            distiller = distill.Distiller(net, spec["alpha"], spec["temperature"]).to(device)
            distiller.check_against(model.to(device), data.x.to(device), f"{desc}.distill")
        with aids.zeros_kept(model.to(device)) as masks:  # and re-applied after each optimiser step
            model, res = fit(model, data.train, data.val, cfg, device=device, run_dir=sdir, resume=True, desc=desc,
                             log_path=log, after_backward=hook, task=self,
                             after_step=masks.after_step if masks is not None else None, distill=distiller)
        return model, res.final.get(f"val_{self.metric}")


class _First:
    """The first ``n`` batches of a loader, the same ones on every pass (a fixed calibration set)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(0)
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


TASK = Classification()
