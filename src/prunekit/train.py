"""Training, fine-tuning and evaluation.

One loop serves base training, fine-tuning and the sparsity stages of the pruning methods:
methods plug in through ``extra_loss`` (added to the task loss), ``after_backward`` (edit
gradients, e.g. the L1 sub-gradient on BN scales) and ``after_step`` (re-apply masks). Every
epoch ends with an atomic checkpoint, so ``resume=True`` after a crash loses at most the
epoch that was running. Under ``torchrun`` the loop runs data-parallel (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import io, tasks
from .errors import PrunekitError
from .measure import hooked
from .tasks import Task

CKPT = "last.pt"
LOG = "log.jsonl"


@dataclass
class TrainConfig:
    """Optimiser and schedule settings; defaults follow the SPEC's CPU protocol base run."""

    epochs: float = 12  # a fraction of an epoch runs that share of its steps (a budget of 0.25 epochs)
    lr: float = 0.2
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.25
    label_smoothing: float = 0.1
    batch_size: int = 128
    amp: bool = True
    channels_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            if not isinstance(v, want) or (f.type in ("int", "float") and isinstance(v, bool)):
                raise PrunekitError(f"invalid training setting {f.name}={v!r}: must be {f.type}")
        checks = {
            "optimizer": (self.optimizer in ("sgd", "adamw"), "sgd, adamw"),
            "schedule": (self.schedule in ("onecycle", "cosine", "constant"), "onecycle, cosine, constant"),
            "epochs": (0 <= self.epochs < math.inf, "a number >= 0 (a fraction runs that share of an epoch's steps)"),
            "lr": (0 < self.lr < math.inf, "a finite number > 0"),
            "batch_size": (self.batch_size > 0, "an integer > 0"),
            "warmup": (0 <= self.warmup < 1, "a fraction in [0, 1)"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "a fraction in [0, 1)"),
            "weight_decay": (0 <= self.weight_decay < math.inf, "a number >= 0"),
            "momentum": (0 <= self.momentum < 1, "a fraction in [0, 1)"),
            "seed": (0 <= self.seed < 2 ** 32, "an integer in [0, 2^32)"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise PrunekitError(f"invalid training setting {key}={getattr(self, key)!r}: allowed {allowed}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PrunekitError(f"unknown training setting(s) {', '.join(unknown)}: allowed {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is a user error, not a crash."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PrunekitError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise PrunekitError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    return dev


def dist_info() -> tuple[int, int]:
    """(rank, world_size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR factor. One-cycle: linear warm-up from lr/25, then cosine down to lr/25000."""
    total = max(1, total_steps(cfg.epochs, steps_per_epoch))
    warm = int(cfg.warmup * total)

    def onecycle(s: int) -> float:
        if s < warm:
            return 0.04 + 0.96 * s / warm
        t = min(s - warm, total - warm) / max(total - warm, 1)
        return 4e-5 + (1 - 4e-5) * 0.5 * (1 + math.cos(math.pi * t))

    def cosine(s: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    factor = {"onecycle": onecycle, "cosine": cosine, "constant": lambda s: 1.0}[cfg.schedule]
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def evaluate(model: nn.Module, loader, device: str | torch.device | None = None,
             task: Task | None = None) -> dict[str, float]:
    """The task's metrics (default classification: top-1 and mean cross-entropy); sums across ranks under DDP."""
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    return (task or tasks.get(tasks.DEFAULT)).evaluate(model, loader, dev)


class BNSparsity:
    """``after_backward`` hook for ``fit``: add s_t·sign(γ) to the gradient of BN scale factors.

    The sub-gradient of the L1 penalty s·Σ|γ| of network slimming (Liu et al. 2017), the sparsity
    training of adaptive-slim and imp-sim. Added after ``fit`` has unscaled the gradients and before
    the optimiser step, so it works under AMP and alongside weight decay. ``bns`` (module names)
    restricts it to the BNs of prunable groups, otherwise every BatchNorm (any ``_BatchNorm``, so
    SyncBatchNorm too). s_t stays at ``s`` or decays to 0 over ``total_steps`` calls (linear / cosine).
    """

    DECAYS = ("constant", "linear", "cosine")

    def __init__(self, s: float, decay: str = "constant", total_steps: int | None = None,
                 bns: list[str] | None = None) -> None:
        if not s >= 0:
            raise PrunekitError(f"sparsity s must be >= 0, got {s}")
        if decay not in self.DECAYS:
            raise PrunekitError(f"sparsity decay must be one of {', '.join(self.DECAYS)}, got {decay!r}")
        if decay != "constant" and not total_steps:
            raise PrunekitError(f"sparsity decay {decay!r} needs total_steps (optimiser steps of the run)")
        self.s, self.decay, self.total_steps = s, decay, total_steps
        self.bns = None if bns is None else list(bns)
        self.step = 0

    def rate(self) -> float:
        """s_t for the next call."""
        if self.decay == "constant":
            return self.s
        p = min(self.step / self.total_steps, 1.0)
        return self.s * (1 - p) if self.decay == "linear" else self.s * 0.5 * (1 + math.cos(math.pi * p))

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        s = self.rate()
        self.step += 1
        if s == 0:
            return
        bns = ([model.get_submodule(n) for n in self.bns] if self.bns is not None
               else [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
        for bn in bns:
            if bn.weight is not None and bn.weight.grad is not None:
                bn.weight.grad.add_(torch.sign(bn.weight), alpha=s)


def _check_resume(ckpt: dict, model: nn.Module, cfg: TrainConfig, run_dir: Path) -> None:
    """A resume must continue the same run: same model and same settings, or say what differs."""
    old = ckpt.get("config") or {}
    diff = [f"{k}: {old[k]!r} in the run, {v!r} now" for k, v in asdict(cfg).items() if k in old and old[k] != v]
    was = (ckpt.get("model") or {}).get("arch", {}).get("name")
    now = (getattr(model, "prunekit_arch", None) or {}).get("name")
    if was != now:
        diff.insert(0, f"model: {was!r} in the run, {now!r} now")
    if diff:
        raise PrunekitError(f"{run_dir} holds a run with other settings ({'; '.join(diff)}); resume with the same "
                            "settings, or use --force / another output directory to start over")


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of ``epochs`` (a fraction of an epoch is its share of the steps, rounded)."""
    return round(epochs * steps_per_epoch)


@torch.no_grad()
def adapt_bn(model: nn.Module, batches) -> None:
    """Reset every BN's statistics and re-estimate them as the plain average over ``batches``.

    Pruning leaves each BN with the statistics of channels that no longer feed it, so the cut model looks
    far worse than its weights are; re-estimated statistics recover most of that with no gradient step
    (EagleEye). Only the BNs run in training mode (dropout stays off); momentum None is the cumulative average.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    with hooked(model):  # eval mode and no grad; every module's mode comes back afterwards
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for x, *_ in batches:
                model(x)
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = "auto",
    run_dir: str | Path | None = None,
    resume: bool = False,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "train",
    log_path: str | Path | None = None,
    task: Task | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train ``model`` for ``cfg.epochs``; returns the (possibly resumed) model and per-epoch history.

    With ``run_dir`` the loop writes ``log.jsonl`` (one JSON line per epoch) and ``last.pt`` after
    every epoch; ``resume=True`` continues from ``last.pt`` (model, optimiser, schedule, epoch).
    ``log_path`` sends the epoch lines to another file (the pipeline's run-level log).
    ``distill(inputs, outputs, task loss)`` replaces the task loss (``prunekit.distill.Distiller``).
    """
    dev = resolve_device(device)
    task = task or tasks.get(tasks.DEFAULT)
    rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else None
    result = TrainResult()
    start_epoch = 0
    ckpt_state = None
    if run_dir is not None and resume and (run_dir / CKPT).exists():
        ckpt_state = io.safe_load(run_dir / CKPT)
        if ckpt_state.get("format") != "prunekit-train":
            raise PrunekitError(f"{run_dir / CKPT} is not a training checkpoint; remove it or use another run dir")
        _check_resume(ckpt_state, model, cfg, run_dir)
        arch = getattr(model, "prunekit_arch", None) or {}
        model = io.build_from_record(ckpt_state, model=None if arch.get("name") else model)
        start_epoch = int(ckpt_state["epoch"]) + 1
        result.history = list(ckpt_state.get("history", []))
    model.to(dev)
    if cfg.channels_last:  # ~20 % faster convolutions on CPU too (measured on ResNet-20)
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = _optimizer(model, cfg)
    steps = len(train_loader)
    limit = total_steps(cfg.epochs, steps)
    if cfg.epochs > 0 and limit < 1:
        raise PrunekitError(f"{cfg.epochs:g} epochs of {steps} steps each round to zero optimiser steps: give more")
    sched = _scheduler(opt, cfg, steps)
    if ckpt_state is not None:
        opt.load_state_dict(ckpt_state["optimizer"])
        sched.load_state_dict(ckpt_state["scheduler"])
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    show = rank == 0
    for epoch in range(start_epoch, math.ceil(cfg.epochs)):
        epoch_steps = min(steps, limit - epoch * steps)  # the last epoch of a fractional count is cut short
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(train_loader, total=epoch_steps, desc=f"{desc} {epoch + 1}/{math.ceil(cfg.epochs)}",
                   disable=not show or None, leave=False, dynamic_ncols=True)
        for x, y in itertools.islice(bar, epoch_steps):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, enabled=use_amp):
                out = net(x)
                loss = task.loss(out, y, cfg.label_smoothing)
                if distill is not None:
                    loss = distill(x, out, loss)
                if extra_loss is not None:
                    loss = loss + extra_loss(model, out, y)
            if not torch.isfinite(loss):
                raise PrunekitError(
                    f"training diverged at epoch {epoch + 1} (loss {loss.item()}); the last good checkpoint is kept: "
                    "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if after_backward is not None:
                after_backward(model)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if after_step is not None:
                after_step(model)
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            correct += task.hits(out, y).item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        val = task.evaluate(model, val_loader, dev) if val_loader is not None else {}
        metric = task.metric
        record = {"stage": desc, "epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": loss_sum / max(seen, 1),
                  f"train_{metric}": 100.0 * correct / max(seen, 1), f"val_{metric}": val.get(metric),
                  "val_loss": val.get("loss"), "lr": opt.param_groups[0]["lr"],
                  "epoch_s": round(time.perf_counter() - t0, 2), "world_size": world}
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise PrunekitError(f"training diverged at epoch {epoch + 1} (non-finite weights); the last good "
                                "checkpoint is kept: lower the learning rate and --resume")
        result.history.append(record)
        if show:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.3f} "
                       f"train {record[f'train_{metric}']:.2f} val {metric} {val.get(metric, float('nan')):.2f} "
                       f"({record['epoch_s']:.0f}s)")
            if run_dir is not None:
                io.atomic_save({"format": "prunekit-train", "version": io.VERSION, "epoch": epoch,
                                "model": io.model_record(model), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "config": asdict(cfg),
                                "history": result.history}, run_dir / CKPT)
            if log_path is not None or run_dir is not None:
                _append_log(Path(log_path) if log_path is not None else run_dir / LOG, record)
        if dist.is_initialized():
            dist.barrier()
    model.to(memory_format=torch.contiguous_format)
    return model, result
