"""Reading and validating a run config: every check that can fail runs here, before the first stage.

Each problem names its key and the allowed values (``config error: <key>: ...``); ``validate`` also fills
the defaults a run directory records (task, method, target, device, seed, name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import distill, io, methods, models, targets, tasks
from ..errors import PrunekitError
from ..errors import config_error as _err
from ..options import POSITIVE, SEED, Field, Schema, check_section
from ..runtimes.ort_int8 import CALIBRATION_METHODS
from ..tasks import Task
from ..train import resolve_device

STAGES = ("train", "sparsify", "prune", "finetune", "cycle", "export")
EXPORT_KEYS = {"stage": str, "int8": bool, "calibration_batches": POSITIVE,
               "calibration_method": Field(str, choices=CALIBRATION_METHODS), "opset": Field(int, 17, 20)}
TOP_KEYS = {"name": str, "model": dict, "data": dict, "method": dict, "target": dict, "stages": list,
            "device": str, "seed": SEED, "out": str, "budget": Field((int, float), minimum=0), "task": str}
MODEL_KEYS = {"name": str, "checkpoint": str, "num_classes": POSITIVE, "kwargs": dict, "trust_pickle": bool}
DATA_KEYS = {"name": str, "root": str, "limit": POSITIVE, "image_size": POSITIVE, "batch_size": POSITIVE,
             "download": bool, "val_fraction": (int, float), "calibration_batches": POSITIVE, "split_seed": SEED}
METHOD_KEYS = {"name": str, "params": dict}
TARGET_KEYS = {k: typ for t in targets.TARGETS.values() for k, typ in t.types.items()}
LATENCY_KEYS = ("latency", *targets.TARGETS["latency"].settings)  # a measured speedup and where it is timed
CYCLE_KEYS = {"stage": str, "stages": list, "max_cycles": POSITIVE, "stop_below": Field((int, float), 0, 1),
              "tolerance": Field((int, float), minimum=0)}
REST = "rest"  # `epochs: rest` = what the run's `budget` has left


def _check_keys(section: dict, allowed: Schema | set, where: str) -> None:
    """A section against its declared schema (a set: keys whose values another check reads)."""
    check_section(section, dict.fromkeys(allowed, object) if isinstance(allowed, set) else allowed, where, _err)


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
    _check_keys(stage, EXPORT_KEYS, where)
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


def _target_error(exc: targets.TargetError) -> PrunekitError:
    return _err(f"target.{exc.key}" if exc.key else "target", exc.reason)


def _check_target(method: methods.Method, params: dict, tgt: dict) -> None:
    """The target a prune stage gives must be the kind the method takes (``prunekit.targets``; its values were
    checked with the config's ``target``)."""
    try:
        targets.check_kind(method, tgt)
    except targets.TargetError as exc:
        raise _target_error(exc) from exc
    try:
        method.check_target(params, set(tgt))
    except PrunekitError as exc:
        raise _err("target", str(exc)) from exc


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
    if "name" not in cfg["data"]:
        raise _err("data.name", f"missing: {task.data_hint}")
    cfg.setdefault("method", {})
    _check_keys(cfg["method"], METHOD_KEYS, "method")
    cfg.setdefault("target", {})
    _check_keys(cfg["target"], TARGET_KEYS, "target")
    try:
        targets.check_values(cfg["target"])
    except targets.TargetError as exc:
        raise _target_error(exc) from exc
    vf = cfg["data"].get("val_fraction")
    if vf is not None and not 0 < vf < 1:
        raise _err("data.val_fraction", f"must be a fraction in (0, 1) of the training data, got {vf!r}")
    budget = cfg.get("budget")
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
    cfg.setdefault("name", Path(cfg["out"]).name)
    return cfg
