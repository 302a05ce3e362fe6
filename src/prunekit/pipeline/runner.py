"""One run directory executed: the stages it has not finished yet, resumed stage by stage, then the final
table (test-split metrics, side-by-side latency, the export) and the report."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import distill, io, methods, tasks
from ..errors import PrunekitError
from ..graph import run_checked
from ..train import dist_info, resolve_device
from . import final
from .config import LATENCY_KEYS, REST


def _write_record(sdir: Path, record: dict) -> None:
    """A finished stage's marker (written after its model: its presence means done) and its readable copy."""
    io.atomic_save(record, sdir / "done.pt")
    (sdir / "stage.json").write_text(json.dumps(record, indent=1, default=str))


class Run:
    """One run directory: executes the stages it has not finished yet. ``cfg``: as ``validate`` returned it."""

    def __init__(self, cfg: dict, *, force: bool = False, out: str | Path | None = None,
                 shared: Path | None = None):
        self.cfg = cfg
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
        self.walls: list[float | None] = []  # seconds of stages run elsewhere: an earlier process, a shared stage
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

    def _finish(self, sdir: Path, model: torch.nn.Module, record: dict, started: float | None = None) -> None:
        """Save a finished stage; ``started``: when it began (its seconds go into its record)."""
        if started is not None:
            record["wall_s"] = round(time.perf_counter() - started, 1)
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

    def _resumed(self, sdir: Path) -> torch.nn.Module | None:
        """A finished stage's model; None when its file was removed and the stage after it finished too: that
        stage resumes from its own model, so a run kept with only its last stage models can still be measured
        again (as a compare re-measures an older cell)."""
        path = sdir / "model.pt"
        if path.exists():
            return io.load(path)
        later = any((d / "done.pt").exists() for d in sdir.parent.glob(f"{self.stage_no + 1:02d}-*"))
        if later and not sdir.name.endswith("-train"):  # a train stage's model is the base the table measures
            return None
        raise PrunekitError(f"{path} was removed and a stage still needs it; use --force to run the whole run "
                            "again")

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
            self.walls.append(done.get("wall_s"))
            return self._resumed(sdir)
        started = time.perf_counter()
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
                self.walls.append(record.get("wall_s"))  # charged the seconds it took to train
                self._finish(sdir, model, {**record, "shared": key})
                return model
        model, metric = self.task.train_stage(
            model, stage, self.data, kind=stage["stage"], epochs=epochs, sdir=sdir,
            aids=tasks.Aids(regularizer, self.method is not None and self.method.keeps_zeros,
                            self._teacher(stage) if "distill" in stage else None),
            seed=self.cfg["seed"], device=self.dev, log=self.log, desc=name)
        if stage["stage"] != "train":
            self.spent += epochs
        record = {"stage": name, "metric": metric, "epochs": epochs}
        self._finish(sdir, model, record, started)
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
        if teacher is None and spec["teacher"] in self.teachers:
            raise PrunekitError(f"the distillation teacher '{spec['teacher']}' (a stage's model.pt) was removed; "
                                "use --force to run the whole run again")
        return (copy.deepcopy(teacher) if teacher is not None else io.load(spec["teacher"])), spec

    def _prune(self, model, name: str, cycle: int = 1) -> tuple[torch.nn.Module, dict]:
        sdir = self._stage_dir(name)
        if self._distils_from_before:
            self.teachers["before"] = copy.deepcopy(model)
        done = self._done(sdir)
        if done is not None:  # the stages after it train their own copy: self.pruned stays as pruned
            self.walls.append(done.get("wall_s"))
            self.pruned = self._resumed(sdir)  # None: not measured straight after pruning this time
            return copy.deepcopy(self.pruned), done
        started = time.perf_counter()
        model = model.to(self.dev)
        tgt = self.cfg["target"]
        sparsity = tgt.get("sparsity")
        if tgt.get("schedule"):  # iterative pruning: cycle c prunes to the c-th level of the schedule
            sparsity = tgt["schedule"][min(cycle, len(tgt["schedule"])) - 1]
        ctx = methods.Context(self.x, self.data.calib, self.data.val, self.dev, self.task)
        result = methods.prune(model, self.method.name, speedup=tgt.get("speedup"), sparsity=sparsity, ctx=ctx,
                               **{k: tgt[k] for k in LATENCY_KEYS if tgt.get(k) is not None},
                               **self.cfg["method"].get("params", {}))
        if cycle == 1 and self.method.kind.removes_channels and result.after["macs"] >= result.before["macs"]:
            fit = result.info.get("channel_fit") or {}
            why = f": {fit['reason']}" if fit.get("reason") else ""
            raise PrunekitError(f"{name}: {self.method.name} removed nothing{why}; train sparsity longer or stronger "
                                "(the sparsify stage's epochs or s) before this prune")
        record = {"stage": name, "metric": self._metric(result.model, "val"), "prune": result.to_dict(),
                  "macs_removed": 1 - result.after["macs"] / max(result.before["macs"], 1)}
        self._finish(sdir, result.model, record, started)
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
        final.add_latency(self.task, self.x, before_model, model, metrics)
        export = next((st for st in self.cfg["stages"] if st["stage"] == "export"), None)
        if export is not None:
            final.add_export(export, self.task, self.data, self.x, self.dir / "export", before_model, model, metrics)
        # the run's seconds: this process's and those of stages run elsewhere, as their records say (None where
        # such a stage ran before prunekit recorded stage times)
        known = None not in self.walls
        metrics["wall_s"] = round(sum(self.walls) + time.perf_counter() - t0, 1) if known else None
        if self.pruned is not None:  # what pruning alone cost, before any fine-tuning (test split)
            metrics["pruned"] = self.task.test_metrics(self.pruned, self.data, self.dev)
        metrics["models"] = {k: str(self.dir / f"{k}.pt") for k in ("before", "after")}  # the report reads them
        if self.rank == 0:
            io.save(before_model, self.dir / "before.pt")
            io.save(model, self.dir / "after.pt")
            io.atomic_save(metrics, self.dir / "metrics.pt")
            io.write_signed_json(metrics, self.dir / "metrics.json")  # a compare reads it back as measured
            from ..report import write_report

            write_report([self.dir])
        return metrics

    def _cycle_epochs(self, st: dict) -> int:
        return sum(self._epochs(s) for s in st["stages"] if s["stage"] != "prune")

    def _cycle(self, st: dict, model) -> torch.nn.Module:
        """Repeat the inner stages until a round removes < stop_below of MACs, the validation metric falls by
        more than ``tolerance`` points, ``max_cycles`` rounds ran, or (with a ``budget``) a round would leave
        no epoch of the budget for the stages after the cycle."""
        if model is None:  # _resumed gives None only when the next stage finished: here, the cycle's first
            raise PrunekitError("cycle: the model it starts from (the previous stage's model.pt) was removed; use "
                                "--force to run the whole run again")
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
            if self.method.kind.removes_channels and removed is not None and \
                    removed < float(st.get("stop_below", 0.01)):
                break
            if sign * (start_metric - metric) > float(st.get("tolerance", 100.0)):
                break
        return model

    def _metrics(self, model) -> dict:
        return final.cost_and_metrics(self.task, model, self.data, self.x, self.dev)
