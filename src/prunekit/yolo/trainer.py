"""Training through Ultralytics: its ``DetectionTrainer`` handed prunekit's model (never rebuilt from its
yaml), its settings checked, its checkpoints signed as this machine's prunekit's own (the only pickles it reopens)."""

from __future__ import annotations

import contextlib
import io as io_
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files
from ..errors import PrunekitError
from . import data
from .distill import HeadDistill
from .model import _detect_heads, _trained_state, input_size
from .offline import config_dir, quiet, threads_kept, ultralytics
from .validation import METRICS

# Settings prunekit gives the trainer itself: in a pipeline they have their own keys.
OWN_SETTINGS = {"epochs": "the stage's epochs", "batch": "the stage's batch_size", "seed": "the stage's seed",
                "imgsz": "data.image_size", "device": "the config's device", "data": "data.name",
                "model": "model", "project": "the run's out", "name": "the run's out", "exist_ok": "the run's out",
                "save_dir": "the run's out",
                "resume": "re-running the config", "pretrained": "model.checkpoint"}


def check_settings(settings: Any, where: str = "ultralytics") -> None:
    """Ultralytics train settings checked by Ultralytics' own config check, before any stage runs; a key prunekit
    sets itself, or one of prunekit's own names, is refused naming the right key."""
    if not isinstance(settings, dict):
        raise PrunekitError(f"{where} must be a mapping of Ultralytics train settings (lr0, optimizer, mosaic, ...)")
    for key in settings:
        if key in OWN_SETTINGS:
            raise PrunekitError(f"{where}.{key} is set by prunekit: use {OWN_SETTINGS[key]} instead")
        if key == "lr":
            raise PrunekitError(f"{where}.lr: Ultralytics calls the learning rate lr0")
    ultralytics()
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg, check_dict_alignment

    try:
        with quiet(logging.CRITICAL), contextlib.redirect_stdout(io_.StringIO()):  # its check logs the CLI help
            check_dict_alignment(DEFAULT_CFG_DICT, dict(settings))
            check_cfg(dict(settings))
    except (SyntaxError, ValueError, TypeError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise PrunekitError(f"{where}: {' '.join(text[:1])[:200]}") from None


@threads_kept()
def train(model: nn.Module, dataset: str | Path, *, epochs: int = 1, imgsz: int | None = None, batch: int = 16,
          device: str = "cpu", project: str | Path | None = None, name: str = "train",
          after_backward: Callable[[nn.Module], None] | None = None, keep: str = "best", resume: bool = False,
          distill: tuple[nn.Module, float, float] | None = None, log_path: str | Path | None = None,
          **overrides: Any) -> dict[str, float]:
    """Train or fine-tune ``model`` (pruned or not) with Ultralytics' ``DetectionTrainer`` and return its metrics.

    Ultralytics' trainer normally rebuilds the network from its yaml, which silently undoes pruning;
    here the trainer is handed prunekit's model object and keeps it, so the architecture trained is the
    one passed in. ``dataset`` is a YOLO data yaml or a Pascal VOC directory (converted by
    ``yolo.data.detection_data``). ``overrides`` are any Ultralytics train arguments (lr0, workers,
    fraction, ...). Afterwards ``model`` holds the weights of the best epoch (EMA, as Ultralytics keeps
    them, judged on the val split; ``keep="last"``: of the last epoch, which sparsity training needs, as
    its best mAP is usually its least sparse epoch) in float32 and eval mode; the returned metrics are
    Ultralytics' validator's on the epoch that ``best`` picked (``metrics/mAP50(B)``, ``metrics/mAP50-95(B)``, ...).

    ``after_backward`` (e.g. ``train.BNSparsity``, the sparsity training of S0/S3) runs on the model before
    every optimiser step, after the gradients are unscaled and before Ultralytics clips their norm: the clip
    then bounds the gradient of the regularised objective and keeps the ratio between the loss's pull on a
    γ and the penalty's (added after the clip, the penalty would shrink every γ alike). Ultralytics sums
    its loss over the images of a batch and accumulates ``nbs / batch`` batches per step, so the model's
    gradients are that many times those of a mean loss; the hook's rate ``s`` is multiplied by the same
    factor, so that ``s`` means what it means in classification training (s·Σ|γ| beside a mean loss).

    ``log_path``: each epoch's validation metrics (in %) are appended there as JSON lines (a run's curve).

    ``resume``: when ``project/name/weights/last.pt`` holds an unfinished run (killed mid-training), continue
    it from its next epoch with its optimiser, EMA and best-so-far, the weights loaded into ``model`` (which
    must have the architecture that run trained); Ultralytics' own resume would rebuild the model instead.
    A finished or missing run starts afresh.

    ``distill=(teacher, alpha, temperature)``: Ultralytics' loss plus α times the head distillation of
    ``prunekit.yolo.distill`` (the teacher in eval mode, on the same batches).
    """
    ultralytics()
    from ultralytics.engine import trainer as ul_trainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    if keep not in ("best", "last"):
        raise PrunekitError(f"keep must be 'best' or 'last', got {keep!r}")
    ds = data.detection_data(dataset)
    head = _detect_heads(model)
    if not head or head[-1].nc != len(ds.names):
        raise PrunekitError(f"the model predicts {head[-1].nc if head else 0} classes but {ds.yaml} has "
                            f"{len(ds.names)} ({', '.join(ds.names)}); build it with num_classes={len(ds.names)}")
    # An absolute project: Ultralytics puts a relative one under its own runs folder, where two runs that
    # name the same relative folder from two places would share (and overwrite) one another's weights.
    project = Path(project or config_dir() / "runs").expanduser().absolute()
    args = {"model": f"{model.yaml.get('yaml_file', 'prunekit')}", "data": str(ds.yaml), "epochs": epochs,
            "imgsz": imgsz or input_size(model), "batch": batch, "device": device, "name": name, "exist_ok": True,
            "project": str(project), "pretrained": False, "plots": False} | overrides
    # Resuming, Ultralytics takes the run folder from the checkpoint: a copied or moved run would write into
    # the original's. The folder is this run's, every time.
    args["save_dir"] = str(project / name)
    _refuse_links(project / name)

    resumed = None
    last = project / name / "weights" / "last.pt"
    signatures = project / name / "prunekit-signatures.json"
    if resume and last.is_file() and not _signed(last, signatures):
        warnings.warn(f"{last} was not written by prunekit on this machine (or changed since): a pickle, so it is "
                      "not opened; the stage trains afresh", stacklevel=2)
    elif resume and last.is_file():
        ckpt = _load_signed(last, signatures)
        if ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0:  # finished runs drop both
            args["resume"], resumed = str(last), ckpt
            try:
                model.load_state_dict(_trained_state(ckpt))
            except RuntimeError as exc:
                raise PrunekitError(f"cannot resume {last}: it trained another architecture than this model "
                                    f"({' '.join(str(exc).split())[:200]})") from exc

    class KeepModelTrainer(DetectionTrainer):
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
            return model

        def _setup_train(self) -> None:
            """With ``distill``: the distilling criterion, once the trainer has given the model its hyper-parameters
            (the EMA copy made here keeps Ultralytics' plain criterion for validation)."""
            super()._setup_train()
            if distill is not None:
                teacher, alpha, temperature = distill
                model.criterion = HeadDistill(model.init_criterion(), teacher.to(self.device).float().eval(), alpha,
                                              temperature)

        def setup_model(self) -> dict | None:
            """The model is prunekit's, never built here; the checkpoint to resume from, if any, goes on to
            ``resume_training`` (epoch, optimiser, EMA)."""
            return resumed

        @contextmanager
        def _signed_writes(self, copy_first: bool) -> Iterator[None]:
            """Ultralytics writes its checkpoints to pending files; they are signed, then moved into place. A kill
            at any point leaves each checkpoint either as it was or as written, signed either way, so an
            interrupted epoch costs that epoch only (never the run: an unsigned last.pt restarts it)."""
            final = (Path(self.last), Path(self.best))
            pending = tuple(p.with_name(f".{p.stem}.pending{p.suffix}") for p in final)
            for f, p in zip(final, pending, strict=True):
                p.unlink(missing_ok=True)  # a kill's leftover (or a planted link): never written through
                if copy_first and f.is_file():
                    shutil.copyfile(f, p)
            self.last, self.best = pending
            try:
                yield
            except BaseException:
                for p in pending:
                    p.unlink(missing_ok=True)
                raise
            finally:
                self.last, self.best = final
            old = _signatures(signatures)
            new = {f.name: files.file_signature(p) for f, p in zip(final, pending, strict=True) if p.is_file()}
            files.atomic_write_text(json.dumps(old | {k: [old.get(k), v] for k, v in new.items()}), signatures)
            for f, p in zip(final, pending, strict=True):
                if p.is_file():
                    os.replace(p, f)
            files.atomic_write_text(json.dumps(old | new), signatures)

        def save_model(self) -> bool:
            """Ultralytics' checkpoints, signed as this machine's prunekit's own (the only pickles it reopens)."""
            with self._signed_writes(copy_first=False):
                return super().save_model()

        def final_eval(self) -> None:
            """Ultralytics strips the optimiser from both checkpoints here, in place: sign what it leaves."""
            with self._signed_writes(copy_first=True):
                super().final_eval()

        def optimizer_step(self) -> None:
            """Ultralytics' own step (unscale, clip, step, EMA), the regulariser added to the unscaled gradients
            first: the gradients are unscaled here, and Ultralytics' second unscale is skipped for this call
            only (a GradScaler refuses a second one), so no line of its step is copied."""
            if after_backward is None:
                return super().optimizer_step()
            self.scaler.unscale_(self.optimizer)
            with _scaled(after_backward, self.batch_size * self.accumulate):
                after_backward(self.model)
            self.scaler.unscale_ = lambda optimizer: None  # already done above
            try:
                return super().optimizer_step()
            finally:
                del self.scaler.unscale_  # the scaler's own method again

    trainer = KeepModelTrainer(overrides=args)
    trainer.model = model
    epochs_seen: list[dict[str, float]] = []

    def epoch_end(tr: Any) -> None:
        """Each epoch's validation metrics: the run log's curve, and what ``keep="last"`` keeps (the final
        evaluation of best.pt after the last epoch calls this too, past the last epoch: not an epoch)."""
        if tr.epoch >= tr.epochs:
            return
        epochs_seen.append({k: float(v) for k, v in (tr.metrics or {}).items()})
        if log_path is not None and tr.metrics:
            row = {"epoch": tr.epoch + 1, **{f"val_{k}": 100 * epochs_seen[-1][v]
                                             for k, v in METRICS.items() if v in epochs_seen[-1]}}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    trainer.add_callback("on_fit_epoch_end", epoch_end)
    # Its AMP self-test downloads yolo26n.pt; prunekit never downloads, so AMP is used on CUDA untested. Patched
    # for this training only: Ultralytics' own function is back afterwards, whatever happens.
    check_amp = ul_trainer.check_amp
    ul_trainer.check_amp = lambda m: next(m.parameters()).device.type == "cuda"
    try:
        trainer.train()
    finally:
        ul_trainer.check_amp = check_amp
        model.criterion = None  # never keep the teacher inside the model

    chosen = trainer.best if keep == "best" else trainer.last
    if chosen.is_file():
        model.load_state_dict(_trained_state(_load_signed(chosen, signatures)))
    model.float().eval()
    if keep == "last" and epochs_seen:  # the metrics of the epoch kept, not of best.pt's final evaluation
        return epochs_seen[-1]
    return {k: float(v) for k, v in (trainer.metrics or {}).items()}


def _refuse_links(run: Path) -> None:
    """Ultralytics writes its checkpoints, results and args with plain writes that follow a symbolic link to
    wherever it points: refuse a run folder holding one where it writes (one line, before training)."""
    for p in (run, run / "weights", run / "weights" / "last.pt", run / "weights" / "best.pt", run / "results.csv",
              run / "args.yaml", run / "prunekit-signatures.json"):
        if p.is_symlink():
            raise PrunekitError(f"{p} is a symbolic link: prunekit never writes through a link (it would change "
                                "the file it points to); remove the link and run again")


def _signatures(signatures: Path) -> dict:
    """The run's signatures file (name → signature), empty when missing or damaged."""
    try:
        signed = json.loads(signatures.read_text()) if signatures.is_file() else {}
    except (OSError, ValueError):
        signed = {}
    return signed if isinstance(signed, dict) else {}


def _signed(path: Path, signatures: Path) -> bool:
    """Whether this machine's prunekit wrote ``path`` (its signature in ``signatures`` matches its bytes; while a
    checkpoint is being replaced, both the old and the new file's signatures are listed)."""
    entry = _signatures(signatures).get(path.name)
    return any(files.signed_by_us(path, s) for s in (entry if isinstance(entry, list) else [entry]))


def _load_signed(path: Path, signatures: Path) -> dict:
    """Unpickle an Ultralytics checkpoint only if this machine's prunekit wrote it, byte for byte."""
    if not _signed(path, signatures):
        raise PrunekitError(f"{path} was not written by prunekit on this machine (or changed since): a pickle, "
                            "so it is not opened; delete it (or use --force) to train the stage afresh")
    return torch.load(path, map_location="cpu", weights_only=False)  # signed: written by this trainer


@contextmanager
def _scaled(hook: Any, factor: float) -> Iterator[None]:
    """A ``BNSparsity``-like hook (attribute ``s``) with its rate multiplied by ``factor`` for one call."""
    s = getattr(hook, "s", None)
    if s is not None:
        hook.s = s * factor
    try:
        yield
    finally:
        if s is not None:
            hook.s = s
