"""Staged, resumable pruning runs: ``prunekit run CONFIG.yaml``.

Every paper here is a pipeline (train → sparsify → prune → fine-tune, the middle repeated for
recurrent methods), so a run is a list of stages in a YAML file. Each stage writes its model
and a ``done.json`` marker into ``RUN_DIR/stages/<n>-<name>/``; re-running the same command
skips finished stages and resumes an interrupted training stage from its last epoch. A run
directory belongs to one config: a changed config is refused unless ``force``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

from . import data as pkdata
from . import io, methods, models
from .errors import PrunekitError
from .measure import measure
from .train import TrainConfig, dist_info, evaluate, fit, resolve_device

TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
STAGES = ("train", "sparsify", "prune", "finetune", "cycle")
TOP_KEYS = {"name": str, "model": dict, "data": dict, "method": dict, "target": dict, "stages": list,
            "device": str, "seed": int, "out": str}
MODEL_KEYS = {"name": str, "checkpoint": str, "num_classes": int, "kwargs": dict}
DATA_KEYS = {"name": str, "root": str, "limit": int, "image_size": int, "batch_size": int, "download": bool}
METHOD_KEYS = {"name": str, "params": dict}
TARGET_KEYS = {"speedup": (int, float), "sparsity": (int, float), "learned": bool, "schedule": list}
CYCLE_KEYS = {"stage", "stages", "max_cycles", "stop_below", "tolerance"}
SPARSIFY_KEYS = {"s", "decay"}


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


def _check_stage(stage: Any, where: str) -> None:
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
            _check_stage(s, f"{where}.stages[{i}]")
            if s["stage"] == "cycle":
                raise _err(f"{where}.stages[{i}]", "cycles cannot be nested")
        if int(stage.get("max_cycles", 3)) < 1:
            raise _err(f"{where}.max_cycles", "must be >= 1")
        return
    allowed = {"stage"} | (set() if kind == "prune" else TRAIN_KEYS) | (SPARSIFY_KEYS if kind == "sparsify" else set())
    _check_keys(stage, allowed, where)
    if kind != "prune":
        try:
            TrainConfig.from_dict({k: v for k, v in stage.items() if k in TRAIN_KEYS})
        except PrunekitError as exc:
            raise _err(where, str(exc)) from exc


def load_config(path: str | Path) -> dict:
    """Read and validate a run config; every problem names its key and the allowed values."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PrunekitError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return validate(cfg)


def validate(cfg: Any) -> dict:
    if not isinstance(cfg, dict):
        raise PrunekitError("config error: the file must be a mapping with model, data, method, stages, out")
    _check_keys(cfg, TOP_KEYS, "")
    for key in ("model", "data", "stages", "out"):
        if key not in cfg:
            raise _err(key, "missing (required keys: model, data, stages, out)")
    _check_keys(cfg["model"], MODEL_KEYS, "model")
    if not cfg["model"].get("name") and not cfg["model"].get("checkpoint"):
        raise _err("model", "give name (zoo or tv:<name>) or checkpoint")
    if cfg["model"].get("name") and not cfg["model"].get("checkpoint"):
        name = cfg["model"]["name"]
        if not (models.is_zoo(name) or name.startswith("tv:")):
            raise _err("model.name", f"unknown model {name!r}; allowed: {', '.join(models.names())} or tv:<name>")
    _check_keys(cfg["data"], DATA_KEYS, "data")
    if "name" not in cfg["data"]:
        raise _err("data.name", "missing: digits, cifar10, synthetic or an ImageFolder path")
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
    if not cfg["stages"]:
        raise _err("stages", "needs at least one stage")
    for i, st in enumerate(cfg["stages"]):
        _check_stage(st, f"stages[{i}]")
    kinds = [s["stage"] for s in cfg["stages"]] + [t["stage"] for s in cfg["stages"] for t in s.get("stages", [])]
    uses_prune = "prune" in kinds
    if uses_prune:
        if "name" not in cfg["method"]:
            raise _err("method.name", "a prune stage needs a method; see `prunekit methods`")
        names = [m.name for m in methods.available()]
        if cfg["method"]["name"] not in names:
            raise _err("method.name", f"unknown method {cfg['method']['name']!r}; allowed: {', '.join(names)}")
    cfg.setdefault("device", "auto")
    cfg.setdefault("seed", 0)
    cfg.setdefault("name", Path(cfg["out"]).name)
    return cfg


class Run:
    """One run directory: executes the stages it has not finished yet."""

    def __init__(self, cfg: dict, *, force: bool = False, out: str | Path | None = None):
        self.cfg = validate(copy.deepcopy(cfg))
        self.dir = Path(out or self.cfg["out"])
        self.rank, _ = dist_info()
        self._claim(force)
        self.dev = resolve_device(self.cfg["device"])
        self.log = self.dir / "log.jsonl"
        self.stage_no = 0

    def _claim(self, force: bool) -> None:
        """Bind the directory to this config; refuse another config's directory unless ``force``."""
        cfg_file = self.dir / "config.yaml"
        if cfg_file.exists():
            old = yaml.safe_load(cfg_file.read_text())
            if old != self.cfg:
                diff = sorted(k for k in set(old) | set(self.cfg) if old.get(k) != self.cfg.get(k))
                if not force:
                    raise PrunekitError(
                        f"run directory {self.dir} belongs to another config (differs at: {', '.join(diff)}); "
                        "use --force to restart it with this config, or choose another out")
                if self.rank == 0:
                    for p in ("stages", "log.jsonl", "metrics.json", "report.md", "report.html", "report_files"):
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
        settings.setdefault("batch_size", self.cfg["data"].get("batch_size", 128))
        settings.setdefault("seed", self.cfg["seed"])
        return TrainConfig.from_dict(settings)

    def _finish(self, sdir: Path, model: torch.nn.Module, record: dict) -> None:
        if self.rank == 0:
            io.save(model, sdir / "model.pt")
            io.atomic_save(record, sdir / "done.pt")  # the marker is written last: its presence means done
            (sdir / "stage.json").write_text(json.dumps(record, indent=1, default=str))
        self._event({"event": "stage_done", **{k: v for k, v in record.items() if k != "prune"}})

    @staticmethod
    def _done(sdir: Path) -> dict | None:
        return io.safe_load(sdir / "done.pt") if (sdir / "done.pt").exists() else None

    # ---- stages ----
    def _initial_model(self, bundle: pkdata.DataBundle) -> torch.nn.Module:
        mc = self.cfg["model"]
        if mc.get("checkpoint"):
            model = io.load(mc["checkpoint"])
            if model.prunekit_arch["num_classes"] != bundle.num_classes:
                raise PrunekitError(
                    f"checkpoint {mc['checkpoint']} has {model.prunekit_arch['num_classes']} classes but data "
                    f"{self.cfg['data']['name']} has {bundle.num_classes}; use a matching checkpoint")
            return model
        torch.manual_seed(self.cfg["seed"])
        model = models.create(mc["name"], num_classes=mc.get("num_classes") or bundle.num_classes,
                              **({"in_channels": bundle.input_shape[0]} | mc.get("kwargs", {})))
        model.prunekit_arch["input_shape"] = list(bundle.input_shape)
        return model

    def _train(self, stage: dict, model, loaders, name: str) -> torch.nn.Module:
        sdir = self._stage_dir(name)
        done = self._done(sdir)
        if done is not None:
            return io.load(sdir / "model.pt")
        cfg = self._train_cfg(stage)
        hook = None
        if name.startswith("sparsify"):
            hook = self._regularizer(stage, cfg, len(loaders[0]))
        masks = self._masks(model)
        model, res = fit(model, loaders[0], loaders[1], cfg, device=self.dev, run_dir=sdir, resume=True,
                         desc=name, log_path=self.log, after_backward=hook,
                         after_step=masks.after_step if masks is not None else None)
        if masks is not None:
            masks.detach()
        self._finish(sdir, model, {"stage": name, "metric": res.final.get("val_top1"), "epochs": cfg.epochs})
        return model

    def _regularizer(self, stage: dict, cfg: TrainConfig, steps: int):
        """The sparsity term of the method: L1 on BN scales (network slimming / adaptive-slim)."""
        from .methods.adaptive_slim import DEFAULT_S, BNSparsity

        return BNSparsity(s=stage.get("s", DEFAULT_S), decay=stage.get("decay", "constant"),
                          total_steps=cfg.epochs * steps)

    def _masks(self, model):
        """Unstructured methods keep their zeros through later training."""
        name = self.cfg["method"].get("name")
        if name and methods.get(name).kind == "unstructured":
            from .methods.magnitude import masks_from_zeros

            masks = masks_from_zeros(model)
            masks.attach(model)
            return masks
        return None

    def _prune(self, model, bundle, name: str, test_loader, cycle: int = 1) -> tuple[torch.nn.Module, dict]:
        sdir = self._stage_dir(name)
        done = self._done(sdir)
        if done is not None:
            return io.load(sdir / "model.pt"), done
        x = pkdata.example_inputs(bundle).to(self.dev)
        model = model.to(self.dev)
        tgt = self.cfg["target"]
        sparsity = tgt.get("sparsity")
        if tgt.get("schedule"):  # iterative pruning: cycle c prunes to the c-th level of the schedule
            sparsity = tgt["schedule"][min(cycle, len(tgt["schedule"])) - 1]
        result = methods.prune(model, self.cfg["method"]["name"], x, speedup=tgt.get("speedup"),
                               sparsity=sparsity, data=test_loader, **self.cfg["method"].get("params", {}))
        metric = evaluate(result.model, test_loader, self.dev)["top1"]
        record = {"stage": name, "metric": metric, "prune": result.to_dict(),
                  "macs_removed": 1 - result.after["macs"] / max(result.before["macs"], 1)}
        self._finish(sdir, result.model, record)
        return result.model, record

    def execute(self) -> dict:
        t0 = time.perf_counter()
        d = self.cfg["data"]
        bundle = pkdata.load(d["name"], d.get("root"), image_size=d.get("image_size"), limit=d.get("limit"),
                             download=bool(d.get("download")), seed=self.cfg["seed"])
        _, world = dist_info()
        loaders = bundle.loaders(batch_size=d.get("batch_size", 128), device=self.dev, seed=self.cfg["seed"],
                                 rank=self.rank, world_size=world)
        model = self._initial_model(bundle)
        x = pkdata.example_inputs(bundle)
        before_model = None
        for st in self.cfg["stages"]:
            kind = st["stage"]
            if kind == "prune" and before_model is None:
                before_model = copy.deepcopy(model)
            if kind in ("train", "finetune", "sparsify"):
                model = self._train(st, model, loaders, kind)
            elif kind == "prune":
                model, _ = self._prune(model, bundle, "prune", loaders[1])
            else:
                before_model = before_model or copy.deepcopy(model)
                model = self._cycle(st, model, bundle, loaders)
        before_model = before_model or model
        metrics = {"name": self.cfg["name"], "method": self.cfg["method"].get("name"), "run_dir": str(self.dir),
                   "before": self._metrics(before_model, loaders[1], x),
                   "after": self._metrics(model, loaders[1], x), "wall_s": round(time.perf_counter() - t0, 1)}
        if self.rank == 0:
            io.atomic_save(metrics, self.dir / "metrics.pt")
            (self.dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
            from .report import write_report

            write_report([self.dir])
        return metrics

    def _cycle(self, st: dict, model, bundle, loaders) -> torch.nn.Module:
        """Repeat the inner stages until a round removes < stop_below of MACs, the metric falls by
        more than ``tolerance`` points, or ``max_cycles`` rounds ran."""
        start_metric = evaluate(model, loaders[1], self.dev)["top1"]
        for c in range(1, int(st.get("max_cycles", 3)) + 1):
            removed = None
            for inner in st["stages"]:
                kind = inner["stage"]
                if kind == "prune":
                    model, rec = self._prune(model, bundle, f"prune-c{c}", loaders[1], cycle=c)
                    removed = rec["macs_removed"]
                else:
                    model = self._train(inner, model, loaders, f"{kind}-c{c}")
            metric = evaluate(model, loaders[1], self.dev)["top1"]
            self._event({"event": "cycle_done", "cycle": c, "macs_removed": removed, "metric": metric})
            kind = methods.get(self.cfg["method"]["name"]).kind if self.cfg["method"].get("name") else None
            if kind != "unstructured" and removed is not None and removed < float(st.get("stop_below", 0.01)):
                break
            if start_metric - metric > float(st.get("tolerance", 100.0)):
                break
        return model

    def _metrics(self, model, test_loader, x) -> dict:
        stats = measure(model.cpu(), x, repeats=10, warmup=2, threads=1)
        return {"top1": evaluate(model, test_loader, "cpu")["top1"], "params": stats["params"],
                "nonzero_params": stats["nonzero_params"], "macs": stats["macs"], "size_bytes": stats["size_bytes"],
                "latency_b1_ms": stats["latency"]["b1"]["median_ms"],
                "latency_b64_ms": stats["latency"]["b64"]["median_ms"], "latency_threads": 1}


def run(config: str | Path | dict, *, force: bool = False, out: str | Path | None = None) -> dict:
    """Run (or resume) the pipeline a config describes; returns the final metrics."""
    cfg = load_config(config) if not isinstance(config, dict) else config
    return Run(cfg, force=force, out=out).execute()
