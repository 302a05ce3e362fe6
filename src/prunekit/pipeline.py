"""Staged, resumable pruning runs: ``prunekit run CONFIG.yaml``.

Every paper here is a pipeline (train → sparsify → prune → fine-tune, the middle repeated for
recurrent methods), so a run is a list of stages in a YAML file. Each stage writes its model
and a ``done.json`` marker into ``RUN_DIR/stages/<n>-<name>/``; re-running the same command
skips finished stages and resumes an interrupted training stage from its last epoch. A run
directory belongs to one config: a changed config is refused unless ``force``.

Data: a seeded, class-stratified share of the *training* split (``data.val_fraction``) is held out
as the validation split (recorded in ``split.json``). Training stages select on it, methods score
their decisions on it, cycles stop on it; the test split is touched only for the final
before/after metrics. The pipeline knows methods only by what they declare (``methods.Method``):
their options, their sparsity regulariser, whether zeros must stay zero.

Detectors (``model.name: ul:<yaml>``, or ``task: detect`` for a checkpoint): ``data.name`` is a Pascal
VOC directory or a YOLO data yaml whose own val split selects and the test split reports; training
stages run Ultralytics' trainer on prunekit's model (``yolo.train``, settings under ``ultralytics:``),
the metric is mAP50-95 (%), and calibration batches are letterboxed training images. An interrupted
training stage resumes from Ultralytics' last epoch checkpoint in its stage directory.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

from . import data as pkdata
from . import distill, io, methods, models
from .errors import PrunekitError
from .graph import Masks, run_checked
from .measure import measure
from .tasks import CLASSIFICATION, DETECTION
from .train import TrainConfig, dist_info, evaluate, fit, resolve_device

TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
STAGES = ("train", "sparsify", "prune", "finetune", "cycle")
TOP_KEYS = {"name": str, "model": dict, "data": dict, "method": dict, "target": dict, "stages": list,
            "device": str, "seed": int, "out": str, "budget": int, "task": str}
TASK_NAMES = ("classify", "detect")
DETECT_TRAIN_KEYS = {"epochs", "batch_size", "seed", "ultralytics"}  # the rest is Ultralytics' own settings
MODEL_KEYS = {"name": str, "checkpoint": str, "num_classes": int, "kwargs": dict}
DATA_KEYS = {"name": str, "root": str, "limit": int, "image_size": int, "batch_size": int, "download": bool,
             "val_fraction": float, "calibration_batches": int, "split_seed": int}
METHOD_KEYS = {"name": str, "params": dict}
TARGET_KEYS = {"speedup": (int, float), "sparsity": (int, float), "learned": bool, "schedule": list}
CYCLE_KEYS = {"stage", "stages", "max_cycles", "stop_below", "tolerance"}
VAL_FRACTION = 0.1
REST = "rest"  # `epochs: rest` = what the run's `budget` has left


def _err(key: str, msg: str) -> PrunekitError:
    return PrunekitError(f"config error at '{key}': {msg}")


def _check_keys(section: dict, allowed: dict | set, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise _err(f"{where}.{unknown[0]}" if where else unknown[0],
                   f"unknown key; allowed: {', '.join(sorted(allowed))}")
    if isinstance(allowed, dict):
        for k, v in section.items():
            typ = allowed[k]
            if v is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
                names = " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
                raise _err(f"{where}.{k}" if where else k, f"must be {names}, got {v!r}")


def _check_stage(stage: Any, where: str, method: methods.Method | None, budget: int | None,
                 detect: bool = False) -> None:
    if not isinstance(stage, dict) or "stage" not in stage:
        raise _err(where, f"each stage is a mapping with 'stage: <one of {', '.join(STAGES)}>'")
    kind = stage["stage"]
    if kind not in STAGES:
        raise _err(f"{where}.stage", f"unknown stage {kind!r}; allowed: {', '.join(STAGES)}")
    if kind == "cycle":
        _check_keys(stage, CYCLE_KEYS, where)
        inner = stage.get("stages")
        if not isinstance(inner, list) or not inner:
            raise _err(f"{where}.stages", "a cycle needs a non-empty list of stages")
        for i, s in enumerate(inner):
            _check_stage(s, f"{where}.stages[{i}]", method, budget, detect)
            if s["stage"] == "cycle":
                raise _err(f"{where}.stages[{i}]", "cycles cannot be nested")
            if s.get("epochs") == REST:
                raise _err(f"{where}.stages[{i}].epochs", "'rest' is for a stage after the cycles")
        for key, typ in (("max_cycles", int), ("stop_below", (int, float)), ("tolerance", (int, float))):
            v = stage.get(key)
            if v is not None and (not isinstance(v, typ) or isinstance(v, bool) or not 0 <= v < math.inf):
                raise _err(f"{where}.{key}", f"must be a finite number >= 0, got {str(v)[:40]!r}")
        if not stage.get("stop_below", 0) <= 1:
            raise _err(f"{where}.stop_below", f"is a fraction of the MACs in [0, 1], got {stage['stop_below']}")
        if stage.get("max_cycles", 3) < 1:
            raise _err(f"{where}.max_cycles", "must be >= 1")
        return
    reg: dict = {}
    if kind == "sparsify":
        if method is None:
            raise _err(f"{where}.stage", "a sparsify stage needs a method with a sparsity regulariser")
        reg = method.regularizer_options
        try:
            method.check_regularizer_options(stage)
        except PrunekitError as exc:
            raise _err(where, str(exc)) from exc
    train_keys = (DETECT_TRAIN_KEYS if detect else TRAIN_KEYS) | {"distill"}
    if "distill" in stage:
        if kind == "prune":
            raise _err(f"{where}.distill", "a prune stage does not train; give distill to a training stage")
        try:
            spec = distill.check(stage["distill"], f"{where}.distill")
        except PrunekitError as exc:
            raise _err(f"{where}.distill", str(exc)) from exc
        if spec["teacher"] not in distill.TEACHERS and not Path(spec["teacher"]).is_file():
            raise _err(f"{where}.distill.teacher", f"{spec['teacher'][:80]!r} is neither base, before nor a model file")
    extra = sorted(set(stage) - {"stage"} - train_keys - set(reg)) if kind != "prune" else []
    if detect and extra and extra[0] in TRAIN_KEYS:
        raise _err(f"{where}.{extra[0]}", "detectors train with Ultralytics' trainer: give its settings under "
                                          "'ultralytics:' (e.g. lr0, optimizer, warmup_epochs)")
    _check_keys(stage, {"stage"} | (set() if kind == "prune" else train_keys) | set(reg), where)
    if detect and kind != "prune":
        if stage.get("ultralytics"):
            from . import yolo

            try:
                yolo.check_settings(stage["ultralytics"])
            except PrunekitError as exc:
                raise _err(f"{where}.ultralytics", str(exc)) from exc
        elif not isinstance(stage.get("ultralytics", {}), dict):
            raise _err(f"{where}.ultralytics", "must be a mapping of Ultralytics train settings")
        if stage.get("epochs") == REST and budget is None:
            raise _err(f"{where}.epochs", "'rest' needs a top-level budget (total training epochs of the run)")
        for key in ("epochs", "batch_size", "seed"):
            v = stage.get(key)
            if v is not None and v != REST and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise _err(f"{where}.{key}", f"must be an integer >= 0, got {v!r}")
    elif kind != "prune":
        settings = {k: v for k, v in stage.items() if k in TRAIN_KEYS}
        if settings.get("epochs") == REST:
            if budget is None:
                raise _err(f"{where}.epochs", "'rest' needs a top-level budget (total training epochs of the run)")
            settings["epochs"] = 0
        try:
            TrainConfig.from_dict(settings)
        except PrunekitError as exc:
            raise _err(where, str(exc)) from exc


def _check_teachers(stages: list) -> None:
    """``teacher: base`` needs the model after the leading train stages, ``before`` a prune earlier in the run."""
    started = pruned = False

    def visit(st: dict, where: str) -> None:
        nonlocal started, pruned
        teacher = (st.get("distill") or {}).get("teacher") if isinstance(st.get("distill"), dict) else None
        kind = st.get("stage")
        if teacher == "base" and kind == "train" and not started:
            raise _err(f"{where}.distill.teacher", "base is the model after the train stages; a train stage before "
                                                   "any sparsify or prune cannot distil from it (give a model file)")
        if teacher == "before" and not pruned:
            raise _err(f"{where}.distill.teacher", "before is the model just before the last prune; no prune stage "
                                                   "comes earlier")
        started |= kind != "train"
        pruned |= kind == "prune"

    for i, st in enumerate(stages):
        if st.get("stage") == "cycle":
            started = True
            for j, inner in enumerate(st["stages"]):
                visit(inner, f"stages[{i}].stages[{j}]")
        else:
            visit(st, f"stages[{i}]")


def _check_target(method: methods.Method, params: dict, tgt: dict) -> None:
    """The target a prune stage gives must be the kind the method takes."""
    if method.kind == "unstructured":
        if "speedup" in tgt:
            raise _err("target.speedup", f"method {method.name} is unstructured: give target.sparsity or schedule")
        if not ({"sparsity", "schedule"} & set(tgt)) and params.get("rule") != "layer-std":
            raise _err("target.sparsity", f"method {method.name} needs target.sparsity or target.schedule")
        return
    if "sparsity" in tgt or "schedule" in tgt:
        raise _err("target", f"method {method.name} removes channels: give target.speedup, not sparsity")
    if method.kind == "structured" and "speedup" not in tgt and params.get("percentile") is None:
        raise _err("target.speedup", f"method {method.name} needs a speedup target")


def load_config(path: str | Path) -> dict:
    """Read and validate a run config; every problem names its key and the allowed values."""
    return validate(io.read_yaml(path))


def validate(cfg: Any) -> dict:
    if not isinstance(cfg, dict):
        raise PrunekitError("config error: the file must be a mapping with model, data, method, stages, out")
    _check_keys(cfg, TOP_KEYS, "")
    for key in ("model", "data", "stages", "out"):
        if cfg.get(key) is None or cfg.get(key) == "":
            raise _err(key, "missing (required keys: model, data, stages, out)")
    for key in ("method", "target"):
        if key in cfg and cfg[key] is None:
            del cfg[key]
    if cfg.get("device") is not None:
        try:
            resolve_device(cfg["device"])
        except PrunekitError as exc:
            raise _err("device", str(exc)) from exc
    _check_keys(cfg["model"], MODEL_KEYS, "model")
    if not cfg["model"].get("name") and not cfg["model"].get("checkpoint"):
        raise _err("model", "give name (zoo, tv:<name> or ul:<name>) or checkpoint")
    if cfg["model"].get("name") and cfg["model"].get("checkpoint"):
        raise _err("model", "give name (a new model) or checkpoint (a model file), not both")
    if cfg["model"].get("num_classes") is not None and cfg["model"]["num_classes"] < 1:
        raise _err("model.num_classes", f"must be >= 1, got {cfg['model']['num_classes']}")
    if cfg["model"].get("name") and not cfg["model"].get("checkpoint"):
        name = cfg["model"]["name"]
        if not (models.is_zoo(name) or name.startswith(("tv:", models.UL_PREFIX))):
            raise _err("model.name", f"unknown model {name!r}; allowed: {', '.join(models.names())}, tv:<name> "
                                     "or ul:<name> (Ultralytics detectors)")
    detect_name = str(cfg["model"].get("name") or "").startswith(models.UL_PREFIX)
    cfg.setdefault("task", "detect" if detect_name else "classify")
    if cfg["task"] not in TASK_NAMES:
        raise _err("task", f"unknown task {cfg['task']!r}; allowed: {', '.join(TASK_NAMES)}")
    if detect_name and cfg["task"] != "detect":
        raise _err("task", f"{cfg['model']['name']} is a detector: task must be detect")
    detect = cfg["task"] == "detect"
    _check_keys(cfg["data"], DATA_KEYS, "data")
    for key in ("image_size", "batch_size", "calibration_batches", "limit"):
        if cfg["data"].get(key) is not None and cfg["data"][key] < 1:
            raise _err(f"data.{key}", f"must be >= 1, got {cfg['data'][key]}")
    if "name" not in cfg["data"]:
        raise _err("data.name", "missing: a VOC directory or YOLO data yaml" if detect else
                   "missing: digits, cifar10, synthetic or an ImageFolder path")
    cfg.setdefault("method", {})
    _check_keys(cfg["method"], METHOD_KEYS, "method")
    cfg.setdefault("target", {})
    _check_keys(cfg["target"], TARGET_KEYS, "target")
    if sum(k in cfg["target"] for k in ("speedup", "sparsity")) > 1:
        raise _err("target", "give one of speedup or sparsity")
    if "speedup" in cfg["target"] and cfg["target"]["speedup"] < 1:
        raise _err("target.speedup", f"must be >= 1, got {cfg['target']['speedup']}")
    if "sparsity" in cfg["target"] and not 0 <= cfg["target"]["sparsity"] < 1:
        raise _err("target.sparsity", f"must be in [0, 1), got {cfg['target']['sparsity']}")
    sched = cfg["target"].get("schedule", [])
    if any(not isinstance(v, int | float) or not 0 <= v < 1 for v in sched) or sched != sorted(sched):
        raise _err("target.schedule", f"must be increasing sparsities in [0, 1) (one per cycle), got {sched!r}")
    vf = cfg["data"].get("val_fraction", VAL_FRACTION)
    if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 < vf < 1:
        raise _err("data.val_fraction", f"must be a fraction in (0, 1) of the training data, got {vf!r}")
    budget = cfg.get("budget")
    if budget is not None and budget < 0:
        raise _err("budget", f"must be >= 0 epochs, got {budget}")
    if not isinstance(cfg["stages"], list) or not cfg["stages"]:
        raise _err("stages", "needs at least one stage")
    method = None
    kinds = [s.get("stage") for s in cfg["stages"] if isinstance(s, dict)]
    kinds += [t.get("stage") for s in cfg["stages"] if isinstance(s, dict) and isinstance(s.get("stages"), list)
              for t in s["stages"] if isinstance(t, dict)]
    if cfg["method"].get("name") is not None:
        names = [m.name for m in methods.available()]
        if cfg["method"]["name"] not in names:
            raise _err("method.name", f"unknown method {cfg['method']['name']!r}; allowed: {', '.join(names)}")
        method = methods.get(cfg["method"]["name"])
        try:
            params = method.check_options(cfg["method"].get("params") or {})
        except PrunekitError as exc:
            raise _err("method.params", str(exc)) from exc
        if "prune" in kinds:
            _check_target(method, params, cfg["target"])
    for i, st in enumerate(cfg["stages"]):
        _check_stage(st, f"stages[{i}]", method, budget, detect)
    _check_teachers(cfg["stages"])
    if "prune" in kinds and method is None:
        raise _err("method.name", "a prune stage needs a method; see `prunekit methods`")
    cfg.setdefault("device", "auto")
    if cfg.get("seed") is None:
        cfg["seed"] = 0
    if not 0 <= cfg["seed"] < 2 ** 32:
        raise _err("seed", f"must be an integer in [0, 2^32), got {str(cfg['seed'])[:40]}")
    split_seed = cfg["data"].get("split_seed") or 0
    if not 0 <= split_seed < 2 ** 32:
        raise _err("data.split_seed", f"must be an integer in [0, 2^32), got {str(split_seed)[:40]}")
    cfg.setdefault("name", Path(cfg["out"]).name)
    return cfg


class Run:
    """One run directory: executes the stages it has not finished yet."""

    def __init__(self, cfg: dict, *, force: bool = False, out: str | Path | None = None):
        self.cfg = validate(copy.deepcopy(cfg))
        self.dir = Path(out or self.cfg["out"]).expanduser().absolute()  # Ultralytics' folders live here too
        self.rank, _ = dist_info()
        self._claim(force)
        self.dev = resolve_device(self.cfg["device"])
        self.log = self.dir / "log.jsonl"
        self.stage_no = 0
        self.spent = 0  # epochs of training stages other than `train` so far (what `budget` counts)
        self.task = DETECTION if self.cfg["task"] == "detect" else CLASSIFICATION
        self.detect = self.task is DETECTION
        self.method = methods.get(self.cfg["method"]["name"]) if self.cfg["method"].get("name") else None
        self.pruned: torch.nn.Module | None = None  # the model straight after the last prune stage
        self.teachers: dict[str, torch.nn.Module] = {}  # distillation teachers: base, before (the last prune's input)

    def _claim(self, force: bool) -> None:
        """Bind the directory to this config; refuse another config's directory unless ``force``."""
        cfg_file = self.dir / "config.yaml"
        self.fresh = not cfg_file.exists()  # a failed start must not leave a directory it claimed behind
        if cfg_file.exists():
            old = yaml.safe_load(cfg_file.read_text())
            if old != self.cfg:
                diff = sorted(k for k in set(old) | set(self.cfg) if old.get(k) != self.cfg.get(k))
                if not force:
                    raise PrunekitError(
                        f"run directory {self.dir} belongs to another config (differs at: {', '.join(diff)}); "
                        "use --force to restart it with this config, or choose another out")
                if self.rank == 0:
                    for p in ("stages", "log.jsonl", "metrics.json", "report.md", "report.html", "report_files",
                              "split.json"):
                        target = self.dir / p
                        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp = cfg_file.with_suffix(".tmp")
                tmp.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
                tmp.replace(cfg_file)
            except OSError as exc:
                raise PrunekitError(f"cannot write run directory {self.dir}: {exc.strerror or exc}") from exc

    # ---- helpers ----
    def _event(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _stage_dir(self, name: str) -> Path:
        self.stage_no += 1
        return self.dir / "stages" / f"{self.stage_no:02d}-{name}"

    def _train_cfg(self, stage: dict) -> TrainConfig:
        settings = {k: v for k, v in stage.items() if k in TRAIN_KEYS}
        if settings.get("epochs") == REST:
            settings["epochs"] = max(0, self.cfg["budget"] - self.spent)
        settings.setdefault("batch_size", self.cfg["data"].get("batch_size", 128))
        settings.setdefault("seed", self.cfg["seed"])
        return TrainConfig.from_dict(settings)

    def _finish(self, sdir: Path, model: torch.nn.Module, record: dict) -> None:
        if self.rank == 0:
            if not (self.dir / "config.yaml").exists():  # a stage must not recreate a folder someone removed
                raise PrunekitError(f"run folder {self.dir} (or its config.yaml) was removed while the run was "
                                    "going; nothing more is written there")
            io.save(model, sdir / "model.pt")
            io.atomic_save(record, sdir / "done.pt")  # the marker is written last: its presence means done
            (sdir / "stage.json").write_text(json.dumps(record, indent=1, default=str))
        self._event({"event": "stage_done", **{k: v for k, v in record.items() if k != "prune"}})

    @staticmethod
    def _done(sdir: Path) -> dict | None:
        """The stage's record if it finished before. Under torchrun every rank must decide alike: the barrier
        keeps rank 0 from finishing (and marking) this stage before another rank has looked."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return io.safe_load(sdir / "done.pt") if (sdir / "done.pt").exists() else None

    def _metric(self, model: torch.nn.Module, loader) -> float:
        """The task's metric on a split: a loader, or for detectors the split's name in the data yaml."""
        if self.detect:
            return 100 * self._det_eval(model, loader)["mAP50-95"]
        return evaluate(model, loader, self.dev, self.task)[self.task.metric]

    def _det_eval(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        from . import yolo

        return yolo.validate(model, self.det.yaml, split=split, imgsz=self.imgsz, device=self._ul_device())

    def _ul_device(self) -> str:
        return "cpu" if self.dev.type == "cpu" else str(self.dev.index or 0)

    # ---- data ----
    def _data(self) -> None:
        """Train / held-out validation / test loaders; the split is recorded (and checked on resume)."""
        d = self.cfg["data"]
        if self.detect:
            return self._detection_data(d)
        split_seed = d.get("split_seed", self.cfg["seed"])  # compare fixes it, so every cell sees one split
        bundle = pkdata.load(d["name"], d.get("root"), image_size=d.get("image_size"), limit=d.get("limit"),
                             download=bool(d.get("download")), seed=split_seed)
        bundle = bundle.holdout(d.get("val_fraction", VAL_FRACTION), seed=split_seed)
        split = {"val_fraction": d.get("val_fraction", VAL_FRACTION), "seed": split_seed,
                 "train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test),
                 "val_indices": bundle.val_indices.tolist()}
        path = self.dir / "split.json"
        if self.rank == 0:
            if path.exists() and json.loads(path.read_text()) != split:
                raise PrunekitError(f"{path} records another validation split than this data gives now (the data "
                                    "set changed?); use --force to restart the run")
            path.write_text(json.dumps(split))
        rank, world = dist_info()
        bs = d.get("batch_size", 128)
        self.bundle = bundle
        self.train_loader, _ = bundle.loaders(batch_size=bs, device=self.dev, seed=self.cfg["seed"], rank=rank,
                                              world_size=world)
        self.val_loader = bundle.eval_loader(bundle.val, 256, self.dev, rank=rank, world_size=world)
        self.test_loader = bundle.eval_loader(bundle.test, 256, self.dev)
        # calibration: un-augmented training batches in a fixed, seeded order (methods take the first n)
        self.calib_loader = bundle.eval_loader(bundle.train, bs, self.dev, shuffle=True, seed=self.cfg["seed"])
        self.x = pkdata.example_inputs(bundle, seed=self.cfg["seed"])

    def _detection_data(self, d: dict) -> None:
        """A detection data set's own splits: train, val (selection) and test (the final table only)."""
        from .yolo.data import detection_data, image_batches

        self.det = detection_data(d["name"])
        missing = [s for s in ("train", "val", "test") if s not in self.det.images]
        if missing:
            raise _err("data.name", f"{d['name']} has no {' or '.join(missing)} split; detectors need train, val "
                                    "and test")
        self.imgsz = d.get("image_size") or 640
        bs = d.get("batch_size", 16)
        self.calib_loader = image_batches(self.det, "train", imgsz=self.imgsz, batch=bs, seed=self.cfg["seed"],
                                          limit=bs * d.get("calibration_batches", 4))
        self.x = self.calib_loader[0][0]
        self.val_loader, self.test_loader = "val", "test"
        (self.dir / "split.json").write_text(json.dumps({"data": str(self.det.yaml), **self.det.images}))

    # ---- stages ----
    def _initial_model(self) -> torch.nn.Module:
        if self.detect:
            return self._initial_detector()
        mc, bundle = self.cfg["model"], self.bundle
        if mc.get("checkpoint"):
            model = io.load(mc["checkpoint"])
            classes = model.prunekit_arch["num_classes"]
            if classes != bundle.num_classes:
                raise PrunekitError(
                    f"checkpoint {mc['checkpoint']} has {classes} classes but data "
                    f"{self.cfg['data']['name']} has {bundle.num_classes}; use a matching checkpoint")
            return model
        torch.manual_seed(self.cfg["seed"])
        model = models.create(mc["name"], num_classes=mc.get("num_classes") or bundle.num_classes,
                              **({"in_channels": bundle.input_shape[0]} | mc.get("kwargs", {})))
        model.prunekit_arch["input_shape"] = list(bundle.input_shape)
        return model

    def _initial_detector(self) -> torch.nn.Module:
        mc, classes = self.cfg["model"], len(self.det.names)
        if mc.get("checkpoint"):
            model = io.load(mc["checkpoint"])
            arch = getattr(model, "prunekit_arch", {})
            if not models.is_detector(model):
                raise PrunekitError(f"checkpoint {mc['checkpoint']} is not an Ultralytics detector (ul:<name>); "
                                    "task: detect needs one")
            if arch["num_classes"] != classes:
                raise PrunekitError(f"checkpoint {mc['checkpoint']} predicts {arch['num_classes']} classes but "
                                    f"{self.det.yaml} has {classes}; use a matching checkpoint")
            return model
        torch.manual_seed(self.cfg["seed"])
        return models.create(mc["name"], num_classes=mc.get("num_classes") or classes,
                             **({"imgsz": self.imgsz} | mc.get("kwargs", {})))

    def _train(self, stage: dict, model, name: str) -> torch.nn.Module:
        if self.detect:
            return self._train_detector(stage, model, name)
        sdir = self._stage_dir(name)
        cfg = self._train_cfg(stage)
        done = self._done(sdir)
        if done is not None:
            self.spent += done.get("epochs", cfg.epochs) if stage["stage"] != "train" else 0
            return io.load(sdir / "model.pt")
        hook = None
        if stage["stage"] == "sparsify":
            settings = self.method.check_regularizer_options(stage)
            hook = self.method.regularizer(model, settings, max(1, cfg.epochs * len(self.train_loader)))
        masks = None
        if self.method is not None and self.method.keeps_zeros:  # unstructured: zeros stay zero in training
            masks = Masks.from_zeros(model.to(self.dev))
            masks.attach(model)
        distiller = self._distiller(stage, model, name)
        model, res = fit(model, self.train_loader, self.val_loader, cfg, device=self.dev, run_dir=sdir, resume=True,
                         desc=name, log_path=self.log, after_backward=hook, task=self.task,
                         after_step=masks.after_step if masks is not None else None, distill=distiller)
        if masks is not None:
            masks.detach()
        if stage["stage"] != "train":
            self.spent += cfg.epochs
        self._finish(sdir, model, {"stage": name, "metric": res.final.get(f"val_{self.task.metric}"),
                                   "epochs": cfg.epochs})
        return model

    def _teacher(self, stage: dict) -> tuple[torch.nn.Module, dict]:
        """The stage's distillation teacher (a copy of base or before, or a model file) and its settings."""
        spec = distill.check(stage["distill"])
        teacher = self.teachers.get(spec["teacher"])
        return (copy.deepcopy(teacher) if teacher is not None else io.load(spec["teacher"])), spec

    def _distiller(self, stage: dict, model, name: str) -> distill.Distiller | None:
        """The stage's teacher, checked against the student before training."""
        if "distill" not in stage:
            return None
        teacher, spec = self._teacher(stage)
        distiller = distill.Distiller(teacher, spec["alpha"], spec["temperature"]).to(self.dev)
        distiller.check_against(model.to(self.dev), self.x.to(self.dev), f"{name}.distill")
        return distiller

    def _train_detector(self, stage: dict, model, name: str) -> torch.nn.Module:
        """A training stage through Ultralytics' trainer; a sparsify stage keeps its last epoch, not its best."""
        from . import yolo

        sdir = self._stage_dir(name)
        epochs = self._detect_epochs(stage)
        done = self._done(sdir)
        if done is not None:
            self.spent += done.get("epochs", epochs) if stage["stage"] != "train" else 0
            return io.load(sdir / "model.pt")
        batch = stage.get("batch_size", self.cfg["data"].get("batch_size", 16))
        hook = None
        if stage["stage"] == "sparsify":
            settings = self.method.check_regularizer_options(stage)
            steps = max(1, epochs * -(-self.det.images["train"] // batch))
            hook = self.method.regularizer(model, settings, steps)
        metrics: dict = {}
        teacher = None
        if epochs and "distill" in stage:
            teacher, spec = self._teacher(stage)
            yolo.distill.check_teacher(teacher, model, self.x, f"{name}.distill")
            teacher = (teacher, spec["alpha"], spec["temperature"])
        if epochs:
            metrics = yolo.train(model, self.det.yaml, epochs=epochs, imgsz=self.imgsz, batch=batch,
                                 device=self._ul_device(), project=sdir, name="ultralytics", after_backward=hook,
                                 resume=True, distill=teacher,
                                 keep="last" if stage["stage"] == "sparsify" else "best",
                                 seed=stage.get("seed", self.cfg["seed"]), **stage.get("ultralytics", {}))
        if stage["stage"] != "train":
            self.spent += epochs
        metric = metrics.get("metrics/mAP50-95(B)")
        self._finish(sdir, model, {"stage": name, "epochs": epochs,
                                   "metric": None if metric is None else 100 * metric})
        return model

    def _detect_epochs(self, stage: dict) -> int:
        """A detector stage's epochs (default 10; ``rest``: what the run's budget has left)."""
        epochs = stage.get("epochs", 10)
        return max(0, self.cfg["budget"] - self.spent) if epochs == REST else epochs

    def _prune(self, model, name: str, cycle: int = 1) -> tuple[torch.nn.Module, dict]:
        sdir = self._stage_dir(name)
        self.teachers["before"] = copy.deepcopy(model)
        done = self._done(sdir)
        if done is not None:
            self.pruned = io.load(sdir / "model.pt")
            return self.pruned, done
        model = model.to(self.dev)
        tgt = self.cfg["target"]
        sparsity = tgt.get("sparsity")
        if tgt.get("schedule"):  # iterative pruning: cycle c prunes to the c-th level of the schedule
            sparsity = tgt["schedule"][min(cycle, len(tgt["schedule"])) - 1]
        calib = self.calib_loader if self.detect else _First(self.calib_loader,
                                                             self.cfg["data"].get("calibration_batches", 64))
        ctx = methods.Context(self.x, calib, None if self.detect else self.val_loader, self.dev, self.task)
        result = methods.prune(model, self.method.name, speedup=tgt.get("speedup"), sparsity=sparsity, ctx=ctx,
                               **self.cfg["method"].get("params", {}))
        if cycle == 1 and self.method.kind != "unstructured" and result.after["macs"] >= result.before["macs"]:
            fit = result.info.get("channel_fit") or {}
            why = f": {fit['reason']}" if fit.get("reason") else ""
            raise PrunekitError(f"{name}: {self.method.name} removed nothing{why}; train sparsity longer or stronger "
                                "(the sparsify stage's epochs or s) before this prune")
        record = {"stage": name, "metric": self._metric(result.model, self.val_loader), "prune": result.to_dict(),
                  "macs_removed": 1 - result.after["macs"] / max(result.before["macs"], 1)}
        self._finish(sdir, result.model, record)
        self.pruned = copy.deepcopy(result.model)
        return result.model, record

    def _unclaim(self) -> None:
        """Give back a directory this run claimed but never started in (its data or model failed to load)."""
        if self.rank == 0 and self.fresh and not (self.dir / "stages").exists():
            for name in ("config.yaml", "split.json", ".lock"):
                (self.dir / name).unlink(missing_ok=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()

    def execute(self) -> dict:
        t0 = time.perf_counter()
        try:
            self._data()
            model = self._initial_model()
            run_checked(model, self.x[:1], f"checking the model against data {self.cfg['data']['name']}")
        except BaseException:
            self._unclaim()
            raise
        for st in self.cfg["stages"]:
            kind = st["stage"]
            if kind != "train" and "base" not in self.teachers:  # the model before any sparsity training
                self.teachers["base"] = copy.deepcopy(model)
            if kind in ("train", "finetune", "sparsify"):
                model = self._train(st, model, kind)
            elif kind == "prune":
                model, _ = self._prune(model, "prune")
            else:
                model = self._cycle(st, model)
        before_model = self.teachers.get("base", model)  # "before": the base, ahead of any sparsity training
        metrics = {"name": self.cfg["name"], "method": self.cfg["method"].get("name"), "run_dir": str(self.dir),
                   "task": self.task.name, "metric": self.task.metric, "metric_label": self.task.metric_label,
                   "split": dict(self.det.images) if self.detect else {
                       "train": len(self.bundle.train), "val": len(self.bundle.val), "test": len(self.bundle.test)},
                   "before": self._metrics(before_model), "after": self._metrics(model),
                   "wall_s": round(time.perf_counter() - t0, 1)}
        if self.pruned is not None:  # what pruning alone cost, before any fine-tuning (test split)
            metrics["pruned"] = self._test_metrics(self.pruned)
        if self.detect:  # the report draws both models' boxes on validation images
            metrics["data"] = str(self.det.yaml)
            metrics["models"] = {k: str(self.dir / f"{k}.pt") for k in ("before", "after")}
            if self.rank == 0:
                io.save(before_model, self.dir / "before.pt")
                io.save(model, self.dir / "after.pt")
        if self.rank == 0:
            io.atomic_save(metrics, self.dir / "metrics.pt")
            (self.dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
            from .report import write_report

            write_report([self.dir])
        return metrics

    def _cycle_epochs(self, st: dict) -> int:
        epochs = self._detect_epochs if self.detect else lambda s: self._train_cfg(s).epochs
        return sum(epochs(s) for s in st["stages"] if s["stage"] != "prune")

    def _cycle(self, st: dict, model) -> torch.nn.Module:
        """Repeat the inner stages until a round removes < stop_below of MACs, the validation metric falls by
        more than ``tolerance`` points, ``max_cycles`` rounds ran, or (with a ``budget``) a round would leave
        no epoch of the budget for the stages after the cycle."""
        start_metric = self._metric(model, self.val_loader)
        sign = 1 if self.task.higher_is_better else -1
        for c in range(1, int(st.get("max_cycles", 3)) + 1):
            if self.cfg.get("budget") is not None and self.cfg["budget"] - self.spent - self._cycle_epochs(st) < 1:
                self._event({"event": "cycle_skipped", "cycle": c, "reason": "budget"})
                break
            removed = None
            for inner in st["stages"]:
                kind = inner["stage"]
                if kind == "prune":
                    model, rec = self._prune(model, f"prune-c{c}", cycle=c)
                    removed = rec["macs_removed"]
                else:
                    model = self._train(inner, model, f"{kind}-c{c}")
            metric = self._metric(model, self.val_loader)
            self._event({"event": "cycle_done", "cycle": c, "macs_removed": removed, "metric": metric})
            if self.method.kind != "unstructured" and removed is not None and \
                    removed < float(st.get("stop_below", 0.01)):
                break
            if sign * (start_metric - metric) > float(st.get("tolerance", 100.0)):
                break
        return model

    def _test_metrics(self, model) -> dict[str, float]:
        """The task's metrics on the test split (the only use of the test split)."""
        if self.detect:
            maps = self._det_eval(model, "test")
            return {"mAP50-95": 100 * maps["mAP50-95"], "mAP50": 100 * maps["mAP50"]}
        return {self.task.metric: self._metric(model.to(self.dev), self.test_loader)}

    def _metrics(self, model) -> dict:
        """Final table: the test split's metrics, cost and latency."""
        if self.detect:
            stats = measure(model.cpu(), self.x[:1], batch_sizes=(1,), repeats=10, warmup=2, threads=1)
            return {**self._test_metrics(model), "params": stats["params"],
                    "macs": stats["macs"], "size_bytes": stats["size_bytes"],
                    "latency_b1_ms": stats["latency"]["b1"]["median_ms"], "latency_threads": 1}
        stats = measure(model.cpu(), self.x[:1], repeats=10, warmup=2, threads=1)
        return {**self._test_metrics(model), "params": stats["params"],
                "nonzero_params": stats["nonzero_params"], "macs": stats["macs"], "size_bytes": stats["size_bytes"],
                "latency_b1_ms": stats["latency"]["b1"]["median_ms"],
                "latency_b64_ms": stats["latency"]["b64"]["median_ms"], "latency_threads": 1}


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


def run(config: str | Path | dict, *, force: bool = False, out: str | Path | None = None) -> dict:
    """Run (or resume) the pipeline a config describes; returns the final metrics.

    The run directory has one writer at a time (``io.run_lock``); under torchrun, rank 0 holds it.
    """
    cfg = load_config(config) if not isinstance(config, dict) else validate(copy.deepcopy(config))
    if out is not None and not str(out).strip():
        raise PrunekitError("--out is empty: give a folder for the run (or leave it out to use the config's out)")
    if dist_info()[0] != 0:
        return Run(cfg, force=force, out=out).execute()
    with io.run_lock(Path(out or cfg["out"])):
        finished = finished_metrics(Path(out or cfg["out"]), cfg)
        if finished is not None and not force:
            print(f"prunekit: {out or cfg['out']} is a finished run of this config; nothing to do (its metrics.json "
                  "is kept; --force measures it again)", file=sys.stderr)
            return finished
        return Run(cfg, force=force, out=out).execute()


def finished_metrics(run_dir: Path, cfg: dict) -> dict | None:
    """The metrics of a run that finished with this config, else None."""
    try:
        if yaml.safe_load((run_dir / "config.yaml").read_text()) != cfg:
            return None
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return metrics if isinstance(metrics, dict) and "after" in metrics else None
