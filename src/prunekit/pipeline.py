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

Everything that depends on the kind of model is the run's task's (``prunekit.tasks``: the data and its
splits, creating and checking models, training stages, the metric); the task is the one that owns
``model.name`` (``ul:<yaml>``: detection) or the name a checkpoint records, unless ``task:`` says.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distill, io, methods, models, tasks, timing
from .errors import PrunekitError
from .errors import config_error as _err
from .graph import run_checked
from .measure import measure
from .tasks import Task
from .train import dist_info, resolve_device

STAGES = ("train", "sparsify", "prune", "finetune", "cycle", "export")
EXPORT_KEYS = {"stage": str, "int8": bool, "calibration_batches": int, "calibration_method": str, "opset": int}
TOP_KEYS = {"name": str, "model": dict, "data": dict, "method": dict, "target": dict, "stages": list,
            "device": str, "seed": int, "out": str, "budget": (int, float), "task": str}
MODEL_KEYS = {"name": str, "checkpoint": str, "num_classes": int, "kwargs": dict, "trust_pickle": bool}
DATA_KEYS = {"name": str, "root": str, "limit": int, "image_size": int, "batch_size": int, "download": bool,
             "val_fraction": float, "calibration_batches": int, "split_seed": int}
METHOD_KEYS = {"name": str, "params": dict}
TARGET_KEYS = {"speedup": (int, float), "sparsity": (int, float), "learned": bool, "schedule": list,
               "latency": (int, float), "runtime": str, "batch": int, "threads": int}
LATENCY_KEYS = ("latency", "runtime", "batch", "threads")  # a measured-speedup target and where it is timed
CYCLE_KEYS = {"stage", "stages", "max_cycles", "stop_below", "tolerance"}
REST = "rest"  # `epochs: rest` = what the run's `budget` has left
LATENCY = {"threads": 1, "rounds": 10}  # the final table's side-by-side timing (eager PyTorch)


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


def _check_stage(stage: Any, where: str, method: methods.Method | None, budget: int | None, task: Task) -> None:
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
            _check_stage(s, f"{where}.stages[{i}]", method, budget, task)
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
    if kind == "export":
        _check_export(stage, where)
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
    train_keys = task.train_keys | {"distill"}
    if "distill" in stage:
        if kind == "prune":
            raise _err(f"{where}.distill", "a prune stage does not train; give distill to a training stage")
        try:
            spec = distill.check(stage["distill"], f"{where}.distill")
        except PrunekitError as exc:
            raise _err(f"{where}.distill", str(exc)) from exc
        if spec["teacher"] not in distill.TEACHERS and not Path(spec["teacher"]).is_file():
            raise _err(f"{where}.distill.teacher", f"{spec['teacher'][:80]!r} is neither base, before nor a model file")
        if spec["teacher"] not in distill.TEACHERS:
            try:  # a teacher file that cannot be loaded is refused now, not after the stages before it ran
                io.safe_load(spec["teacher"])
            except PrunekitError as exc:
                raise _err(f"{where}.distill.teacher", str(exc)) from exc
    extra = sorted(set(stage) - {"stage"} - train_keys - set(reg)) if kind != "prune" else []
    if extra and task.train_keys_hint:
        raise _err(f"{where}.{extra[0]}", f"unknown key; {task.train_keys_hint}")
    _check_keys(stage, {"stage"} | (set() if kind == "prune" else train_keys) | set(reg), where)
    if kind != "prune":
        if stage.get("epochs") == REST and budget is None:
            raise _err(f"{where}.epochs", "'rest' needs a top-level budget (total training epochs of the run)")
        task.check_stage(stage, where)


def _check_export(stage: dict, where: str) -> None:
    """``{stage: export, int8: true, calibration_batches: 16, calibration_method: minmax, opset: 17}``."""
    from .runtimes.ort_int8 import CALIBRATION_METHODS

    _check_keys(stage, EXPORT_KEYS, where)
    if stage.get("calibration_batches", 1) < 1:
        raise _err(f"{where}.calibration_batches", f"must be >= 1, got {stage['calibration_batches']}")
    if stage.get("calibration_method", "minmax") not in CALIBRATION_METHODS:
        raise _err(f"{where}.calibration_method", f"one of {', '.join(CALIBRATION_METHODS)}, got "
                   f"{str(stage['calibration_method'])[:40]!r}")
    if not 17 <= stage.get("opset", 17) <= 20:
        raise _err(f"{where}.opset", f"must be 17 to 20, got {stage['opset']}")
    if not stage.get("int8") and ({"calibration_batches", "calibration_method"} & set(stage)):
        raise _err(where, "calibration_* set up int8 calibration: add int8: true")


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
    if "latency" in tgt and method.kind != "structured":
        raise _err("target.latency", f"method {method.name} is {method.kind}: a latency target needs a method "
                                     "that removes channels to a target")
    if method.kind == "unstructured":
        if "speedup" in tgt:
            raise _err("target.speedup", f"method {method.name} is unstructured: give target.sparsity or schedule")
    elif "sparsity" in tgt or "schedule" in tgt:
        raise _err("target", f"method {method.name} removes channels: give target.speedup, not sparsity")
    try:
        method.check_target(params, set(tgt))
    except PrunekitError as exc:
        raise _err("target", str(exc)) from exc


def _check_latency_target(tgt: dict) -> None:
    """``target: {latency: 2.0, runtime: onnxruntime, batch: 64, threads: 2}``: a speedup measured on a runtime."""
    from .latency import check_setting

    if tgt.get("latency") is None:
        if set(LATENCY_KEYS[1:]) & set(tgt):
            raise _err("target", "runtime, batch and threads say where a latency target is timed: add target.latency")
        return
    if "speedup" in tgt:
        raise _err("target", "give latency (a measured speedup) or speedup (a MACs ratio), not both")
    if not math.isfinite(tgt["latency"]) or tgt["latency"] <= 1:
        raise _err("target.latency", f"must be a finite number > 1 (base time / pruned time, measured), got "
                   f"{tgt['latency']}")
    for key in ("batch", "threads"):
        if key in tgt and tgt[key] < 1:
            raise _err(f"target.{key}", f"must be >= 1, got {tgt[key]}")
    try:
        check_setting(tgt.get("runtime", "eager"), 1, 1)
    except PrunekitError as exc:
        raise _err("target.runtime", str(exc)) from exc


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
    name = cfg["model"].get("name") or (io.recorded_name(cfg["model"]["checkpoint"])
                                        if "task" not in cfg and cfg["model"].get("checkpoint") else None)
    owner = tasks.for_name(name) if name else None
    cfg.setdefault("task", owner.name if owner is not None else tasks.DEFAULT)
    if cfg["task"] not in tasks.names():
        raise _err("task", f"unknown task {cfg['task']!r}; allowed: {', '.join(tasks.names())}")
    if owner is not None and owner.name != cfg["task"]:
        raise _err("task", f"{cfg['model']['name']} is a model of task {owner.name}: task must be {owner.name}")
    task = tasks.get(cfg["task"])
    _check_keys(cfg["data"], DATA_KEYS, "data")
    for key in ("image_size", "batch_size", "calibration_batches", "limit"):
        if cfg["data"].get(key) is not None and cfg["data"][key] < 1:
            raise _err(f"data.{key}", f"must be >= 1, got {cfg['data'][key]}")
    if "name" not in cfg["data"]:
        raise _err("data.name", f"missing: {task.data_hint}")
    cfg.setdefault("method", {})
    _check_keys(cfg["method"], METHOD_KEYS, "method")
    cfg.setdefault("target", {})
    _check_keys(cfg["target"], TARGET_KEYS, "target")
    if sum(k in cfg["target"] for k in ("speedup", "sparsity")) > 1:
        raise _err("target", "give one of speedup or sparsity")
    if "speedup" in cfg["target"] and cfg["target"]["speedup"] < 1:
        raise _err("target.speedup", f"must be >= 1, got {cfg['target']['speedup']}")
    _check_latency_target(cfg["target"])
    if "sparsity" in cfg["target"] and not 0 <= cfg["target"]["sparsity"] < 1:
        raise _err("target.sparsity", f"must be in [0, 1), got {cfg['target']['sparsity']}")
    sched = cfg["target"].get("schedule", [])
    if any(not isinstance(v, int | float) or not 0 <= v < 1 for v in sched) or sched != sorted(sched):
        raise _err("target.schedule", f"must be increasing sparsities in [0, 1) (one per cycle), got {sched!r}")
    vf = cfg["data"].get("val_fraction")
    if vf is not None and (isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 < vf < 1):
        raise _err("data.val_fraction", f"must be a fraction in (0, 1) of the training data, got {vf!r}")
    budget = cfg.get("budget")
    if budget is not None and not 0 <= budget < math.inf:
        raise _err("budget", f"must be >= 0 epochs, got {budget}")
    if budget is not None and budget != int(budget) and not task.fractional_epochs:
        raise _err("budget", f"{budget:g} is a fraction of an epoch; the {task.name} task trains whole epochs")
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
        _check_stage(st, f"stages[{i}]", method, budget, task)
        if isinstance(st, dict) and st.get("stage") == "export" and i != len(cfg["stages"]) - 1:
            raise _err(f"stages[{i}]", "export writes the final model: it is the last stage")
        if isinstance(st, dict) and st.get("stage") == "cycle" and \
                any(isinstance(t, dict) and t.get("stage") == "export" for t in st.get("stages") or []):
            raise _err(f"stages[{i}].stages", "export writes the final model: it is the last stage, not in a cycle")
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


def _write_record(sdir: Path, record: dict) -> None:
    """A finished stage's marker (written after its model: its presence means done) and its readable copy."""
    io.atomic_save(record, sdir / "done.pt")
    (sdir / "stage.json").write_text(json.dumps(record, indent=1, default=str))


class Run:
    """One run directory: executes the stages it has not finished yet."""

    def __init__(self, cfg: dict, *, force: bool = False, out: str | Path | None = None,
                 shared: Path | None = None):
        self.cfg = validate(copy.deepcopy(cfg))
        self.shared = shared  # a folder of sparsity stages that runs of one compare share (see _shared_key)
        self.dir = Path(out or self.cfg["out"]).expanduser().absolute()  # Ultralytics' folders live here too
        self.rank, _ = dist_info()
        self._claim(force)
        self.dev = resolve_device(self.cfg["device"])
        self.log = self.dir / "log.jsonl"
        self.stage_no = 0
        self.spent = 0  # epochs of training stages other than `train` so far (what `budget` counts)
        self.task = tasks.get(self.cfg["task"])
        self.method = methods.get(self.cfg["method"]["name"]) if self.cfg["method"].get("name") else None
        self.pruned: torch.nn.Module | None = None  # the model straight after the last prune stage
        self.teachers: dict[str, torch.nn.Module] = {}  # distillation teachers: base, before (the last prune's input)
        inner = [t for s in self.cfg["stages"] for t in (s.get("stages") or [s])]
        self._distils_from_before = any((t.get("distill") or {}).get("teacher") == "before" for t in inner)

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

    def _epochs(self, stage: dict) -> int:
        """A training stage's epochs (``rest``: what the run's budget has left)."""
        epochs = self.task.stage_epochs(stage)
        return max(0, self.cfg["budget"] - self.spent) if epochs == REST else epochs

    def _finish(self, sdir: Path, model: torch.nn.Module, record: dict) -> None:
        if self.rank == 0:
            if not (self.dir / "config.yaml").exists():  # a stage must not recreate a folder someone removed
                raise PrunekitError(f"run folder {self.dir} (or its config.yaml) was removed while the run was "
                                    "going; nothing more is written there")
            io.save(model, sdir / "model.pt")
            _write_record(sdir, record)
        self._event({"event": "stage_done", **{k: v for k, v in record.items() if k != "prune"}})

    @staticmethod
    def _done(sdir: Path) -> dict | None:
        """The stage's record if it finished before. Under torchrun every rank must decide alike: the barrier
        keeps rank 0 from finishing (and marking) this stage before another rank has looked."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return io.safe_load(sdir / "done.pt") if (sdir / "done.pt").exists() else None

    def _metric(self, model: torch.nn.Module, split: str) -> float:
        """The task's metric on the run's ``val`` or ``test`` split."""
        return self.task.score(model, self.data, split, self.dev)

    # ---- data ----
    def _data(self) -> None:
        """The task's splits; the split is recorded (and checked on resume)."""
        d = self.cfg["data"]
        self.data = self.task.load_data(d, seed=self.cfg["seed"], device=self.dev,
                                        split_seed=d.get("split_seed", self.cfg["seed"]))  # compare fixes it
        self.x = self.data.x
        path = self.dir / "split.json"
        if self.rank == 0:
            if path.exists() and json.loads(path.read_text()) != self.data.record:
                raise PrunekitError(f"{path} records another validation split than this data gives now (the data "
                                    "set changed?); use --force to restart the run")
            path.write_text(json.dumps(self.data.record))
            for name, src in self.data.files.items():  # e.g. the split a task made, beside the run that used it
                (self.dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, self.dir / name)

    # ---- stages ----
    def _initial_model(self) -> torch.nn.Module:
        mc = self.cfg["model"]
        if mc.get("checkpoint"):
            model = io.load(mc["checkpoint"])
            self.task.check_model(model, self.data, f"checkpoint {mc['checkpoint']}")
            return model
        return self.task.create_model(mc, self.data, self.cfg["seed"])

    def _train(self, stage: dict, model, name: str) -> torch.nn.Module:
        """A training stage (train, sparsify, finetune) as the task trains; resumes where it stopped."""
        sdir = self._stage_dir(name)
        epochs = self._epochs(stage)
        done = self._done(sdir)
        if done is not None:
            self.spent += done.get("epochs", epochs) if stage["stage"] != "train" else 0
            return io.load(sdir / "model.pt")
        regularizer = key = None
        if stage["stage"] == "sparsify":
            settings = self.method.check_regularizer_options(stage)
            ignored = self.cfg["method"].get("params", {}).get("ignored_layers")  # the layers the prune will keep
            regularizer = lambda net, steps: self.method.regularizer(net, settings, steps, self.x, ignored)  # noqa: E731
            key = self._shared_key(stage, epochs, settings, ignored)
            if key is not None and (self.shared / key / "done.pt").exists():
                record = io.safe_load(self.shared / key / "done.pt")
                model = io.load(self.shared / key / "model.pt")
                self.spent += epochs
                self._finish(sdir, model, {**record, "shared": key})
                return model
        model, metric = self.task.train_stage(
            model, stage, self.data, kind=stage["stage"], epochs=epochs, sdir=sdir, regularizer=regularizer,
            keep_zeros=self.method is not None and self.method.keeps_zeros,
            teacher=self._teacher(stage) if "distill" in stage else None, seed=self.cfg["seed"], device=self.dev,
            log=self.log, desc=name)
        if stage["stage"] != "train":
            self.spent += epochs
        record = {"stage": name, "metric": metric, "epochs": epochs}
        self._finish(sdir, model, record)
        if key is not None and self.rank == 0:
            self._share(key, sdir, {**record, "trained_by": self.cfg["name"]})
        return model

    def _shared_key(self, stage: dict, epochs: int, settings: dict, ignored: Any) -> str | None:
        """What a sparsity stage's result depends on, when it is the run's first stage: the checkpoint's
        bytes, the stage, the regulariser and its settings, the data, the seed. Methods that rank by the same
        regulariser (net-slim, imp-sim, adaptive-slim) then train it once per seed in a compare, and each is
        still charged its epochs; the result is what each would have trained alone."""
        if self.shared is None or self.stage_no != 1 or not self.cfg["model"].get("checkpoint"):
            return None
        fn = self.method.regularizer
        spec = {"checkpoint": io.sha256_file(self.cfg["model"]["checkpoint"]), "stage": stage, "epochs": epochs,
                "regularizer": f"{fn.__module__}.{fn.__qualname__}", "settings": settings, "ignored": ignored,
                "keeps_zeros": self.method.keeps_zeros, "data": self.cfg["data"], "seed": self.cfg["seed"],
                "task": self.cfg["task"], "device": self.cfg["device"]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _share(self, key: str, sdir: Path, record: dict) -> None:
        """Publish a finished sparsity stage (its folder ``sdir``) under its key; written to a temporary folder
        and renamed, so a reader sees all of it or nothing."""
        dst = self.shared / key
        if dst.exists():
            return
        tmp = self.shared / f".{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(sdir / "model.pt", tmp / "model.pt")
        _write_record(tmp, record)
        try:
            tmp.rename(dst)
        except OSError:  # another run published it first
            shutil.rmtree(tmp, ignore_errors=True)

    def _teacher(self, stage: dict) -> tuple[torch.nn.Module, dict]:
        """The stage's distillation teacher (a copy of base or before, or a model file) and its settings."""
        spec = distill.check(stage["distill"])
        teacher = self.teachers.get(spec["teacher"])
        return (copy.deepcopy(teacher) if teacher is not None else io.load(spec["teacher"])), spec

    def _prune(self, model, name: str, cycle: int = 1) -> tuple[torch.nn.Module, dict]:
        sdir = self._stage_dir(name)
        if self._distils_from_before:
            self.teachers["before"] = copy.deepcopy(model)
        done = self._done(sdir)
        if done is not None:  # the stages after it train their own copy: self.pruned stays as pruned
            self.pruned = io.load(sdir / "model.pt")
            return copy.deepcopy(self.pruned), done
        model = model.to(self.dev)
        tgt = self.cfg["target"]
        sparsity = tgt.get("sparsity")
        if tgt.get("schedule"):  # iterative pruning: cycle c prunes to the c-th level of the schedule
            sparsity = tgt["schedule"][min(cycle, len(tgt["schedule"])) - 1]
        ctx = methods.Context(self.x, self.data.calib, self.data.val, self.dev, self.task)
        result = methods.prune(model, self.method.name, speedup=tgt.get("speedup"), sparsity=sparsity, ctx=ctx,
                               **{k: tgt[k] for k in LATENCY_KEYS if tgt.get(k) is not None},
                               **self.cfg["method"].get("params", {}))
        if cycle == 1 and self.method.kind != "unstructured" and result.after["macs"] >= result.before["macs"]:
            fit = result.info.get("channel_fit") or {}
            why = f": {fit['reason']}" if fit.get("reason") else ""
            raise PrunekitError(f"{name}: {self.method.name} removed nothing{why}; train sparsity longer or stronger "
                                "(the sparsify stage's epochs or s) before this prune")
        record = {"stage": name, "metric": self._metric(result.model, "val"), "prune": result.to_dict(),
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
            elif kind == "cycle":
                model = self._cycle(st, model)
        before_model = self.teachers.get("base", model)  # "before": the base, ahead of any sparsity training
        metrics = {"name": self.cfg["name"], "method": self.cfg["method"].get("name"), "run_dir": str(self.dir),
                   "task": self.task.name, "metric": self.task.metric, "metric_label": self.task.metric_label,
                   "split": self.data.sizes, **self.data.info,
                   "before": self._metrics(before_model), "after": self._metrics(model)}
        self._latency(before_model, model, metrics)
        export = next((st for st in self.cfg["stages"] if st["stage"] == "export"), None)
        if export is not None:
            self._export(export, before_model, model, metrics)
        metrics["wall_s"] = round(time.perf_counter() - t0, 1)
        if self.pruned is not None:  # what pruning alone cost, before any fine-tuning (test split)
            metrics["pruned"] = self._test_metrics(self.pruned)
        metrics["models"] = {k: str(self.dir / f"{k}.pt") for k in ("before", "after")}  # the report reads them
        if self.rank == 0:
            io.save(before_model, self.dir / "before.pt")
            io.save(model, self.dir / "after.pt")
            io.atomic_save(metrics, self.dir / "metrics.pt")
            (self.dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
            from .report import write_report

            write_report([self.dir])
        return metrics

    def _cycle_epochs(self, st: dict) -> int:
        return sum(self._epochs(s) for s in st["stages"] if s["stage"] != "prune")

    def _cycle(self, st: dict, model) -> torch.nn.Module:
        """Repeat the inner stages until a round removes < stop_below of MACs, the validation metric falls by
        more than ``tolerance`` points, ``max_cycles`` rounds ran, or (with a ``budget``) a round would leave
        no epoch of the budget for the stages after the cycle."""
        start_metric = self._metric(model, "val")
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
            metric = self._metric(model, "val")
            self._event({"event": "cycle_done", "cycle": c, "macs_removed": removed, "metric": metric})
            if self.method.kind != "unstructured" and removed is not None and \
                    removed < float(st.get("stop_below", 0.01)):
                break
            if sign * (start_metric - metric) > float(st.get("tolerance", 100.0)):
                break
        return model

    def _test_metrics(self, model) -> dict[str, float]:
        """The task's metrics on the test split (the only use of the test split)."""
        return self.task.test_metrics(model, self.data, self.dev)

    def _metrics(self, model) -> dict:
        """Final table: the test split's metrics and cost."""
        stats = measure(model.cpu(), self.x[:1], with_latency=False)
        return {**self._test_metrics(model), "params": stats["params"], "nonzero_params": stats["nonzero_params"],
                "macs": stats["macs"], "size_bytes": stats["size_bytes"]}

    def _latency(self, before: torch.nn.Module, after: torch.nn.Module, metrics: dict) -> None:
        """Base and pruned model timed as ``compare`` times them: side by side in interleaved rounds at fixed
        threads, so a load burst hits both; the speedup is the median per-round ratio with its spread."""
        res = timing.side_by_side({"base": before.cpu(), "pruned": after.cpu()}, self.x[:1],
                                  batch_sizes=self.task.latency_batches, runtimes=("eager",),
                                  mode=self.task.export_mode, **LATENCY)
        for b in self.task.latency_batches:
            row = res[f"eager_b{b}"]
            metrics["before"][f"latency_b{b}_ms"] = row["base"]["median_ms"]
            metrics["after"][f"latency_b{b}_ms"] = row["pruned"]["median_ms"]
            metrics["after"][f"speedup_b{b}"] = row["pruned"]["ratio"]
        metrics["latency"] = {"runtime": "eager", **LATENCY}


    def _export(self, st: dict, before: torch.nn.Module, after: torch.nn.Module, metrics: dict) -> None:
        """The final model (and the base, for its ratios) as ONNX in ``OUT/export/``; with ``int8``, beside it the
        int8 model calibrated on training batches, each file's test metric measured by running it, and every file
        timed on ONNX Runtime against the fp32 base in one set of interleaved rounds."""
        from .export import deploy_table, export_int8, export_onnx

        folder = self.dir / "export"
        folder.mkdir(exist_ok=True)
        files = {"before": (before.cpu(), folder / "base.onnx"), "after": (after.cpu(), folder / "model.onnx")}
        if not st.get("int8"):
            for model, path in files.values():
                with self.task.export_mode(model):
                    export_onnx(model, self.x[:1].cpu(), path, opset=st.get("opset", 17))
            metrics["export"] = {"onnx": str(files["after"][1])}
            return
        n = st.get("calibration_batches", 16)
        calib = [b[0] for b in self.data.calib][:n]
        for model, path in files.values():
            export_int8(model, calib, path, method=st.get("calibration_method", "minmax"), opset=st.get("opset", 17))
        table = deploy_table(files, self.data, self.task, batch_sizes=self.task.latency_batches,
                             threads=LATENCY["threads"], rounds=LATENCY["rounds"])
        metric = self.task.metric
        for side in ("before", "after"):
            row = metrics[side]
            row[f"int8_{metric}"] = table[side]["int8"][metric]
            row["int8_size_bytes"] = table[side]["int8_bytes"]
            for b in self.task.latency_batches:
                lat = table["latency"][f"b{b}"]
                row[f"int8_speedup_b{b}"] = lat[f"{side}/int8"]["ratio"]  # against the fp32 base, ONNX Runtime
                if side == "after":
                    row[f"ort_speedup_b{b}"] = lat["after/fp32"]["ratio"]
        metrics["export"] = {"onnx": str(files["after"][1]), "int8": str(folder / "model.int8.onnx"),
                             "calibration_batches": len(calib), "int8_table": table}


def run(config: str | Path | dict, *, force: bool = False, out: str | Path | None = None,
        shared: str | Path | None = None) -> dict:
    """Run (or resume) the pipeline a config describes; returns the final metrics.

    The run directory has one writer at a time (``io.run_lock``); under torchrun, rank 0 holds it.
    ``shared``: a folder where a leading sparsity stage is looked up and published (``compare`` passes one).
    """
    shared = Path(shared).absolute() if shared is not None else None
    cfg = load_config(config) if not isinstance(config, dict) else validate(copy.deepcopy(config))
    if out is not None and not str(out).strip():
        raise PrunekitError("--out is empty: give a folder for the run (or leave it out to use the config's out)")
    if dist_info()[0] != 0:
        return Run(cfg, force=force, out=out, shared=shared).execute()
    with io.run_lock(Path(out or cfg["out"])):
        finished = finished_metrics(Path(out or cfg["out"]), cfg)
        if finished is not None and not force:
            print(f"prunekit: {out or cfg['out']} is a finished run of this config; nothing to do (its metrics.json "
                  "is kept; --force measures it again)", file=sys.stderr)
            return finished
        return Run(cfg, force=force, out=out, shared=shared).execute()


def finished_metrics(run_dir: Path, cfg: dict) -> dict | None:
    """The metrics of a run that finished with this config, else None."""
    try:
        if yaml.safe_load((run_dir / "config.yaml").read_text()) != cfg:
            return None
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(metrics, dict):
        return None
    key = metrics.get("metric")
    number = lambda side: isinstance(side, dict) and isinstance(side.get(key), int | float) \
        and not isinstance(side.get(key), bool) and math.isfinite(side[key])  # noqa: E731
    return metrics if isinstance(key, str) and number(metrics.get("after")) and number(metrics.get("before")) else None
