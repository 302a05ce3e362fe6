"""``prunekit compare CONFIG.yaml``: which method, at what speedup, for how much accuracy, side by side.

Every pruning user asks which method to pick for *their* model and data. A compare answers it the only fair
way: from **one base** (a checkpoint, or a ``train`` stage run once and cached), every (method × target ×
seed) cell gets the **same post-base budget** in epochs (a method's sparsity training counts against it), on
**one data split** (the held-out validation split is fixed by the base's seed, whatever the cell's seed),
and is measured by the same code. Each cell is an ordinary pipeline run directory under ``OUT/cells/``, so a
killed compare resumes at the cell and stage where it stopped and finished cells are never re-run. Methods
that rank by the same sparsity regulariser (net-slim, imp-sim, adaptive-slim) train their identical sparsify
stage once per seed (``OUT/shared``): each cell is still charged its epochs, and its prune starts from the
very model it would have trained alone. Latency is measured for every cell **side by side in one process**
(``prunekit.timing``: interleaved rounds, fixed threads, median and spread; a ratio whose spread holds 1.0
is "within noise"). The result is ``OUT/leaderboard.json`` (one row per method and target, mean ± std over
seeds), the same table printed and as Markdown, and an HTML page with the metric against the MACs ratio and
against the measured latency ratio.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distill, io, methods, models, pipeline, runtimes, tasks
from .errors import PrunekitError
from .runtimes.ort_int8 import CALIBRATION_METHODS

KEYS = {"name": str, "out": str, "task": str, "device": str, "data": dict, "base": dict, "methods": list,
        "targets": list, "seeds": list, "budget": (int, float), "budgets": list, "finetune": dict, "sparsify": dict,
        "latency": (dict, bool), "distill": list, "int8": (dict, bool)}
INT8_KEYS = {"calibration_batches": int, "method": str}
INT8_DEFAULTS = {"calibration_batches": 16, "method": "minmax"}
INT8_RUNTIME = "onnxruntime-int8"
_INT8_KEY = runtimes.RUNTIMES[INT8_RUNTIME].key + "_"  # its latency columns: speedup against the fp32 base
BASE_KEYS = {"checkpoint": str, "model": dict, "train": dict, "seed": int}
ENTRY_KEYS = {"name": str, "label": str, "params": dict, "targets": list, "budgets": list, "sparsify": (dict, bool),
              "stages": list, "search_epochs": int}
LATENCY_KEYS = {"batch": int, "threads": int, "rounds": int, "runtimes": list}
LATENCY_DEFAULTS = {"batch": 64, "threads": 2, "rounds": 15, "runtimes": list(runtimes.DEFAULT)}
SPARSIFY_EPOCHS = 1  # a method's sparsity training when the config does not say (it counts against the budget)
RECALIBRATE = 20  # budget 0: calibration batches of the training split that re-estimate BN statistics
LEARNED = "learned"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def _err(key: str, msg: str) -> PrunekitError:
    return PrunekitError(f"compare config error at '{key}': {msg}")


def _check_keys(section: Any, allowed: dict, where: str) -> None:
    if not isinstance(section, dict):
        raise _err(where, "must be a mapping")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise _err(f"{where}.{unknown[0]}" if where else unknown[0], f"unknown key; allowed: {', '.join(allowed)}")
    for k, v in section.items():
        typ = allowed[k]
        if v is None:  # a key written with no value: say so here, not inside a cell after the others ran
            raise _err(f"{where}.{k}" if where else k, "has no value (null); give one or leave the key out")
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            names = " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
            raise _err(f"{where}.{k}" if where else k, f"must be {names}, got {str(v)[:80]!r}")


def _pipeline_target(t: float | str | dict) -> dict:
    """A compare target as a pipeline's ``target``; a latency target with prune's timing defaults filled in."""
    if isinstance(t, dict):
        return {"runtime": "eager", "batch": 64, "threads": 2, **t}
    return {"learned": True} if t == LEARNED else {"speedup": float(t)}


def _target_name(t: float | str | dict) -> str:
    if isinstance(t, dict):  # a measured speedup: where it is timed is part of its name
        t = _pipeline_target(t)
        rt = runtimes.RUNTIMES[t["runtime"]].key if t["runtime"] in runtimes.RUNTIMES else t["runtime"]
        return f"lat{float(t['latency']):g}x-{rt}-b{t['batch']}-t{t['threads']}"
    return LEARNED if t == LEARNED else f"{float(t):g}x"


def _entries(cfg: dict) -> list[dict]:
    """The methods list as entries ``{name, label, params, targets, sparsify, stages}``, checked."""
    if not cfg["methods"]:
        raise _err("methods", "the list is empty: name at least one method (see `prunekit methods`)")
    out, labels = [], set()
    for i, e in enumerate(cfg["methods"]):
        where = f"methods[{i}]"
        e = {"name": e} if isinstance(e, str) else e
        _check_keys(e, ENTRY_KEYS, where)
        if not e.get("name"):
            raise _err(f"{where}.name", "missing: a method name (see `prunekit methods`)")
        names = [m.name for m in methods.available()]
        if e["name"] not in names:
            raise _err(f"{where}.name", f"unknown method {e['name']!r}; allowed: {', '.join(names)}")
        m = methods.get(e["name"])
        if m.kind == "unstructured":
            raise _err(f"{where}.name", f"{m.name} is unstructured (sparsity, no speedup): compare ranks channel "
                                        "pruning by speedup; benchmark it with a pipeline instead")
        try:
            m.check_options(e.get("params") or {})
        except PrunekitError as exc:
            raise _err(f"{where}.params", str(exc)) from exc
        label = e.get("label") or e["name"]
        if not _LABEL.match(label):
            raise _err(f"{where}.label", f"{label!r} must be letters, digits, '.', '_', '+' or '-' (it names folders)")
        budgets = e.get("budgets", _budgets(cfg))
        _check_budgets(budgets, f"{where}.budgets" if "budgets" in e else "budgets")
        if any((label, b) in labels for b in budgets):
            raise _err(f"{where}.label", f"{label!r} appears twice at one budget; give each entry its own label "
                                         "(or its own budgets)")
        labels |= {(label, b) for b in budgets}
        targets = e.get("targets", cfg["targets"])
        _check_targets(targets, f"{where}.targets" if "targets" in e else "targets")
        for t in targets:
            if t == LEARNED and m.kind != "adaptive":
                raise _err(f"{where}.targets" if "targets" in e else "targets",
                           f"'learned' is for methods that choose their own cut (adaptive-slim); {m.name} needs a "
                           "speedup: give this entry its own targets")
            if isinstance(t, dict) and m.kind != "structured":
                raise _err(f"{where}.targets" if "targets" in e else "targets",
                           f"a latency target needs a method that removes channels to a target; {m.name} is "
                           f"{m.kind}: give this entry its own targets")
        sparsify = e.get("sparsify", True)
        if sparsify is not False and m.regularizer is None and isinstance(sparsify, dict):
            raise _err(f"{where}.sparsify", f"{m.name} declares no sparsity regulariser")
        search = e.get("search_epochs", 0)
        if search is None or not 0 <= search < max(budgets + [1]):
            raise _err(f"{where}.search_epochs", f"must be in [0, budget) epochs, got {search}")
        out.append({"name": m.name, "label": label, "params": e.get("params") or {}, "targets": targets,
                    "budgets": budgets, "sparsify": sparsify if m.regularizer is not None else False,
                    "stages": e.get("stages"), "search_epochs": search})
    return out


def _budgets(cfg: dict) -> list[float]:
    """The budget axis: ``budgets``, or the one ``budget``."""
    return cfg["budgets"] if cfg.get("budgets") is not None else [cfg["budget"]]


def _check_budgets(budgets: Any, where: str) -> None:
    if not isinstance(budgets, list) or not budgets:
        raise _err(where, "give a non-empty list of epochs after the base (0: prune and re-estimate BN only; "
                          "a fraction of an epoch runs that share of its steps)")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b < math.inf:
            raise _err(where, f"{str(b)[:40]!r} is not a number of epochs >= 0")
    if len(set(budgets)) != len(budgets):
        raise _err(where, "a budget appears twice")


def _search_charge(search: int, budget: float) -> int:
    """Epochs a search (auto-mend's) is charged at a budget: its epochs where a fine-tune epoch is left after
    them, else none (a leaderboard row shows what each was charged)."""
    return search if budget - search >= 1 else 0


def _check_targets(targets: Any, where: str) -> None:
    if not isinstance(targets, list) or not targets:
        raise _err(where, "give a non-empty list of speedups (base MACs / pruned MACs), 'learned' and/or "
                          "{latency: X, runtime, batch, threads} (a measured speedup)")
    for t in targets:
        if isinstance(t, dict):  # {latency: 2.0, runtime: onnxruntime, batch: 64, threads: 2}: a measured speedup
            unknown = sorted(set(t) - set(pipeline.LATENCY_KEYS))
            if unknown or not isinstance(t.get("latency"), int | float) or isinstance(t.get("latency"), bool):
                raise _err(where, f"{str(t)[:60]!r}: a latency target is {{latency: X, runtime, batch, threads}}"
                                  + (f" (unknown key {unknown[0]!r})" if unknown else ""))
            continue
        ok = t == LEARNED or (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 1)
        if not ok:
            raise _err(where, f"{str(t)[:40]!r} is neither a speedup > 1, 'learned' nor {{latency: X, ...}}")
    if len({_target_name(t) for t in targets}) != len(targets):
        raise _err(where, "a target appears twice")


def validate(cfg: Any) -> dict:
    """Check a compare config, build every cell's pipeline config and validate those too: all before any work."""
    if not isinstance(cfg, dict):
        raise PrunekitError("compare config error: the file must be a mapping with base, data, methods, targets, "
                            "seeds, budget, out")
    _check_keys(cfg, KEYS, "")
    if cfg.get("budget") is None and cfg.get("budgets") is not None:  # the axis alone: its largest names cells
        _check_budgets(cfg["budgets"], "budgets")
        cfg = {**cfg, "budget": max(cfg["budgets"])}
    for key in ("base", "data", "methods", "targets", "seeds", "budget", "out"):
        if cfg.get(key) is None or cfg.get(key) == "":
            raise _err(key, "missing (required: base, data, methods, targets, seeds, budget or budgets, out)")
    _check_keys(cfg["base"], BASE_KEYS, "base")
    base = cfg["base"]
    if bool(base.get("checkpoint")) == bool(base.get("model")):
        raise _err("base", "give either checkpoint (a prunekit model file) or model (+ train settings)")
    if base.get("checkpoint") and base.get("train"):
        raise _err("base.train", "a checkpoint base is not trained again; drop train or give model instead")
    seed = base.get("seed", 0)
    if not 0 <= seed < 2 ** 32:
        raise _err("base.seed", f"must be in [0, 2^32), got {seed}")
    seeds = cfg["seeds"]
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2 ** 32 for s in seeds):
        raise _err("seeds", f"must be a non-empty list of integers in [0, 2^32), got {str(seeds)[:80]}")
    if len(set(seeds)) != len(seeds):
        raise _err("seeds", "a seed appears twice")
    if not 0 <= cfg["budget"] < math.inf:
        raise _err("budget", f"must be >= 0 epochs after the base, got {cfg['budget']}")
    _check_budgets(_budgets(cfg), "budgets")
    _check_targets(cfg["targets"], "targets")
    if cfg.get("latency") is True:
        raise _err("latency", "a mapping of timing settings, or false to time nothing")
    lat = False if cfg.get("latency") is False else {**LATENCY_DEFAULTS, **(cfg.get("latency") or {})}
    if lat is not False:
        _check_keys(lat, LATENCY_KEYS, "latency")
        for k in ("batch", "threads", "rounds"):
            if lat[k] < 1:
                raise _err(f"latency.{k}", f"must be >= 1, got {lat[k]}")
        if not lat["runtimes"] or set(lat["runtimes"]) - set(runtimes.names()):
            raise _err("latency.runtimes", f"a non-empty list of {', '.join(runtimes.names())}")
    q: dict | bool = False
    if cfg.get("int8") not in (None, False):
        q = {**INT8_DEFAULTS, **(cfg["int8"] if isinstance(cfg["int8"], dict) else {})}
        _check_keys(q, INT8_KEYS, "int8")
        if q["calibration_batches"] < 1:
            raise _err("int8.calibration_batches", f"must be >= 1, got {q['calibration_batches']}")
        if q["method"] not in CALIBRATION_METHODS:
            raise _err("int8.method", f"one of {', '.join(CALIBRATION_METHODS)}, got {q['method']!r}")
        if lat is not False and INT8_RUNTIME not in lat["runtimes"]:  # int8 latency beside the metric
            lat = {**lat, "runtimes": [*lat["runtimes"], INT8_RUNTIME]}
    for key in ("finetune", "sparsify"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise _err(key, "must be a mapping of training settings")
        if "epochs" in (cfg.get("finetune") or {}):
            raise _err("finetune.epochs", "the fine-tune takes what the budget leaves (epochs: rest); set budget")
    data = dict(cfg["data"])
    for key in ("root", "name"):  # paths made absolute: every run of the compare reads the same files
        if isinstance(data.get(key), str) and (key == "root" or Path(data[key]).exists()):
            data[key] = str(Path(data[key]).expanduser().absolute().resolve())
    if base.get("checkpoint"):
        base = {**base, "checkpoint": str(Path(base["checkpoint"]).expanduser().absolute().resolve())}
    variants = cfg.get("distill") or [None]
    if not isinstance(variants, list) or len(variants) > 4:
        raise _err("distill", "a list of at most 4: null (fine-tune on labels) or {teacher, alpha, temperature}")
    for i, v in enumerate(variants):
        if v is not None:
            distill.check(v, f"distill[{i}]")
        if v in variants[:i]:
            raise _err(f"distill[{i}]", "the same variant appears twice (it would count as two seeds of one run)")
    cfg = {**{k: v for k, v in cfg.items() if k != "int8"}, "latency": lat, "base": {**base, "seed": seed},
           "data": data, **({"int8": q} if q else {})}  # no int8 key when off: older compare folders still match
    cfg.setdefault("name", Path(cfg["out"]).name)
    cfg.setdefault("device", "auto")
    entries = _entries(cfg)
    base_cfg = _base_config(cfg, Path(cfg["out"]))
    pipeline.validate(copy.deepcopy(base_cfg))
    cells = _cells(cfg, entries, Path(cfg["out"]))
    for cell in cells:
        try:
            pipeline.validate(copy.deepcopy(cell["config"]))
        except PrunekitError as exc:
            raise PrunekitError(f"compare cell {cell['id']}: {exc}") from exc
    return cfg


def load_config(path: str | Path) -> dict:
    """Read and validate a compare config."""
    return validate(_read(path))


def _read(path: str | Path) -> Any:
    return io.read_yaml(path, "compare config")


# ---- the runs a compare consists of ----
def _task(cfg: dict) -> str | None:
    """The task every run gets: the config's, else the one the base model's name (or checkpoint) belongs to."""
    if cfg.get("task"):
        return cfg["task"]
    base = cfg["base"]
    name = (base.get("model") or {}).get("name") or (io.recorded_name(base["checkpoint"]) if base.get("checkpoint")
                                                     else None)
    return "detect" if str(name or "").startswith(models.UL_PREFIX) else None


def _data(cfg: dict) -> dict:
    """The data section every run gets: one held-out split, fixed by the base's seed."""
    return {**cfg["data"], "split_seed": cfg["base"]["seed"]}


def _base_config(cfg: dict, out: Path) -> dict:
    """The base as a pipeline run: its train stage (0 epochs for a checkpoint, which only measures it)."""
    b = cfg["base"]
    model = {"checkpoint": b["checkpoint"]} if b.get("checkpoint") else b["model"]
    train = {**(b.get("train") or {}), "stage": "train"} if b.get("model") else {"stage": "train", "epochs": 0}
    base = {"name": "base", "model": model, "data": _data(cfg), "seed": b["seed"], "device": cfg["device"],
            "out": str(out / "base"), "stages": [train]}
    task = _task(cfg)
    if task:
        base["task"] = task
    return base


def _base_model_path(cfg: dict, out: Path) -> Path:
    return out / "base" / "stages" / "01-train" / "model.pt"


def _cells(cfg: dict, entries: list[dict], out: Path) -> list[dict]:
    """Every (budget, seed, method, target) cell as a pipeline config, cheapest budget first and then seed-major,
    so a partial compare has whole budgets and whole seeds."""
    cells = []
    ft = dict(cfg.get("finetune") or {})
    given = cfg.get("distill") or [None]
    kd = [v for v in given if v is not None]
    variants = [(v, "" if v is None else "+kd" if len(kd) == 1 else f"+kd{kd.index(v) + 1}") for v in given]
    task = _task(cfg)  # once: for a checkpoint base it reads the file
    order = ((b, s, e, v) for b in sorted(_budgets(cfg)) for s in cfg["seeds"] for e in entries for v in variants)
    for b, seed, e, (kd_spec, suffix) in order:
        if b not in e["budgets"]:
            continue
        label = e["label"] + suffix
        for t in e["targets"]:
            # the compare's own budget names cells as a one-budget compare does, so its finished cells are reused
            cid = f"{label}-{_target_name(t)}" + ("" if b == cfg["budget"] else f"-ft{b:g}") + f"-s{seed}"
            search = _search_charge(e["search_epochs"], b)
            params = dict(e["params"])
            if e["stages"] is not None:
                stages = copy.deepcopy(e["stages"])
            elif b == 0 and e["sparsify"] is False:  # no gradient step: the cut, BN statistics re-estimated
                stages = [{"stage": "prune"}]
                params.setdefault("bn_recalibrate", RECALIBRATE)
            else:
                stages = []
                if e["sparsify"] is not False:
                    sp = {**ft, **(cfg.get("sparsify") or {}), **(e["sparsify"] if isinstance(e["sparsify"], dict)
                                                                   else {})}
                    sp.setdefault("epochs", SPARSIFY_EPOCHS)
                    if isinstance(sp["epochs"], int) and sp["epochs"] > b - search:
                        raise _err(f"methods ({e['label']}).sparsify.epochs",
                                   f"{sp['epochs']} sparsity epochs do not fit the budget of {b:g}; give this entry "
                                   "its own budgets, or sparsify: false at the smaller ones")
                    stages.append({"stage": "sparsify", **sp})
                stages += [{"stage": "prune"}, {"stage": "finetune", **ft, "epochs": "rest",
                                                **({"distill": kd_spec} if kd_spec else {})}]
            budget = b - search  # a search (auto-mend's) is charged as epochs
            _check_budget(stages, budget, e["label"])
            target = _pipeline_target(t)
            if "seed" in methods.get(e["name"]).options:  # a method's own randomness follows the cell's seed
                params.setdefault("seed", seed)
            config = {"name": cid, "model": {"checkpoint": str(_base_model_path(cfg, out))}, "data": _data(cfg),
                      "method": {"name": e["name"], "params": params}, "target": target, "seed": seed,
                      "budget": budget, "device": cfg["device"], "out": str(out / "cells" / cid),
                      "stages": stages}
            if task:
                config["task"] = task
            cells.append({"id": cid, "label": label, "method": e["name"], "target": _target_name(t),
                          "budget": b, "search_charged": search, "seed": seed, "config": config,
                          "distill": kd_spec})
    return cells


def _check_steps(cfg: dict, cells: list[dict], out: Path) -> None:
    """A budget's fraction of an epoch must be at least one optimiser step; the base's split says how many
    steps an epoch has, so this is known before any cell runs."""
    fractions = sorted({c["config"]["budget"] for c in cells if c["config"]["budget"] % 1})
    if not fractions:
        return
    try:
        train = int(json.loads((out / "base" / "split.json").read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a task that records no split size: its trainer refuses such a fraction itself
    task = tasks.get(_task(cfg) or tasks.DEFAULT)
    steps = max(1, train // cfg["data"].get("batch_size", task.default_batch))
    for b in fractions:
        if round(b % 1 * steps) < 1:
            raise _err("budgets", f"{b:g} epochs: its fraction of an epoch ({steps} steps) rounds to zero steps")


def _check_budget(stages: list, budget: int, label: str) -> None:
    """Epochs a method's stages spend outside 'rest' (cycles at their most rounds) must fit the budget."""
    def epochs(s: dict) -> int:
        if not isinstance(s, dict):
            return 0
        if s.get("stage") == "cycle":
            return int(s.get("max_cycles", 3)) * sum(epochs(x) for x in s.get("stages") or [])
        if s.get("stage") == "train":
            raise _err(f"methods ({label}).stages", "a train stage after the base is not part of a compare; use "
                                                    "sparsify or finetune (they count against the budget)")
        e = s.get("epochs", 0)
        return e if isinstance(e, int) and not isinstance(e, bool) else 0

    spent = sum(epochs(s) for s in stages)
    if spent > budget:
        raise _err(f"methods ({label})", f"its stages need {spent} epochs, more than the budget of {budget}")


# ---- running ----
def _claim(cfg: dict, out: Path, force: bool) -> None:
    """Bind the out folder to this config; another compare's folder is refused, listing what differs."""
    path = out / "compare.yaml"
    if not path.exists() and (out / "config.yaml").exists() and (out / "stages").is_dir():
        raise PrunekitError(f"{out} is a pipeline run's folder (config.yaml, stages/): a compare writes its own "
                            "folder; choose another out")
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, ValueError):
            old = None
        if not isinstance(old, dict) and not force:
            raise PrunekitError(f"{path} is damaged (not a compare config); use --force to rewrite it (finished "
                                "cells whose config matches are kept), or another --out")
        old = old if isinstance(old, dict) else {}
        if old != cfg and not force:
            diff = sorted(k for k in set(old or {}) | set(cfg) if (old or {}).get(k) != cfg.get(k))
            raise PrunekitError(f"{out} holds a compare with another config (differs at: {', '.join(diff)}); use "
                                "--force to reuse it (cells whose own config changed are re-run), or another --out")
    io.atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), path)


def _say(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def _finished(config: dict) -> dict | None:
    """A pipeline run's metrics if it finished with this very config (read, not re-measured), else None."""
    return pipeline.finished_metrics(Path(config["out"]), pipeline.validate(copy.deepcopy(config)))


def _run(config: dict, force: bool, shared: Path | None = None) -> dict:
    return _finished(config) or pipeline.run(config, force=force, shared=shared)


def _run_cell(cell: dict, force: bool, out: Path) -> dict | None:
    """Run (or resume) one cell; a failure is recorded and returned as None so the others go on. Cells of one
    seed whose methods share a sparsity regulariser train that stage once (``OUT/shared``)."""
    errors_dir = out / "errors"
    err_path = errors_dir / f"{cell['id']}.json"
    try:
        metrics = _run(cell["config"], force, out / "shared")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a method refusing a target, or any bug: recorded, the compare goes on
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, PrunekitError):
            msg = f"{type(exc).__name__}: {msg}"
        errors_dir.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(json.dumps({"error": msg, "trace": traceback.format_exc()[-4000:]}, indent=1), err_path)
        _say(f"{cell['id']} failed: {msg}")
        return None
    err_path.unlink(missing_ok=True)
    return metrics


def final_model_path(run_dir: Path) -> Path:
    """The model a finished pipeline run ended with: its last finished stage's model."""
    done = sorted((run_dir / "stages").glob("*/done.pt"))
    if not done:
        raise PrunekitError(f"{run_dir} has no finished stage")
    return done[-1].parent / "model.pt"


def _latency(cfg: dict, out: Path, base_path: Path, cells: list[dict], hashes: dict[str, str]) -> dict[str, dict]:
    """Every finished cell's final model timed side by side with the base; cached until a model changes
    (``hashes``: the sha256 of each model file, by cell id and ``base``)."""
    from . import timing

    files = {"base": base_path} | {c["id"]: c["model_path"] for c in cells}
    settings = cfg["latency"]
    cache = out / "latency.json"
    old = _json(cache)
    if old.get("settings") == settings and old.get("models") == hashes and _latency_shape(old.get("results"), files):
        return old["results"]
    if cache.exists():
        _say(f"{cache} is stale, damaged or for other models: measuring again")
    loaded = {k: io.load(p) for k, p in files.items()}
    base = loaded["base"]
    shape = (getattr(base, "prunekit_arch", None) or {}).get("input_shape")
    if not shape:
        raise PrunekitError(f"{base_path} records no input shape; cannot time it")
    _say(f"measuring latency of {len(loaded)} models side by side (this takes a few minutes; keep the machine quiet)")
    batches = sorted({1, settings["batch"]})
    timed = dict(batch_sizes=batches, threads=settings["threads"], rounds=settings["rounds"],
                 mode=tasks.for_model(base).export_mode, progress=_say)  # a detector: one output
    x = torch.zeros(1, *shape)
    plain = [r for r in settings["runtimes"] if r != INT8_RUNTIME]
    results = timing.side_by_side(loaded, x, runtimes=plain, **timed) if plain else {}
    if INT8_RUNTIME in settings["runtimes"]:  # each int8 model against the fp32 base, in the same rounds
        across = timing.side_by_side(loaded, x, runtimes=("onnxruntime", INT8_RUNTIME), across=True, **timed)
        key = runtimes.RUNTIMES[INT8_RUNTIME].key
        for b in batches:
            results[f"{key}_b{b}"] = {n: across[f"b{b}"][f"{n}/{key}"] for n in loaded}
    io.atomic_write_text(json.dumps({"settings": settings, "models": hashes, "results": results}, indent=1), cache)
    return results


def _json(path: Path) -> dict:
    """A cache file's mapping; {} when it is missing, not JSON or not a mapping (the cache is then rebuilt)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _latency_shape(results: Any, files: dict) -> bool:
    """Whether cached latency results hold, per setting, a positive time and a ratio for every model."""
    def ok(v: Any) -> bool:
        r = v.get("ratio") if isinstance(v, dict) else None
        return (isinstance(v.get("median_ms"), int | float) and v["median_ms"] > 0 and isinstance(r, dict)
                and all(isinstance(r.get(k), int | float) and math.isfinite(r[k]) and r[k] > 0
                        for k in ("median", "lo", "hi")))

    return isinstance(results, dict) and bool(results) and all(
        isinstance(per, dict) and set(files) <= set(per) and all(ok(per[k]) for k in files) for per in results.values())


def _int8(cfg: dict, out: Path, base_path: Path, cells: list[dict], hashes: dict[str, str]) -> dict[str, dict]:
    """Every finished model and the base exported int8 (calibrated on training batches of the base's split) and
    its metrics measured by running the int8 file on the test split; cached in ``OUT/int8.json`` until a model
    or the int8 settings change. The ONNX files stay in ``OUT/int8/``."""
    from .export import export_int8, int8_path
    from .runtimes.ort import OnnxModule

    files = {"base": base_path} | {c["id"]: c["model_path"] for c in cells}
    cache, work = out / "int8.json", out / "int8"
    old = _json(cache)
    done = old.get("results", {}) if old.get("settings") == cfg["int8"] else {}
    done = done if isinstance(done, dict) else {}
    done = {k: v for k, v in done.items() if isinstance(v, dict) and v.get("sha256") == hashes.get(k)}
    todo = [k for k in files if k not in done]
    if todo:
        base_cfg = _base_config(cfg, out)
        base = io.load(base_path)
        task = tasks.for_model(base)
        spec = {**base_cfg["data"], "calibration_batches": cfg["int8"]["calibration_batches"]}
        data = task.load_data(spec, seed=base_cfg["seed"], split_seed=spec["split_seed"], device=torch.device("cpu"))
        calib = [b[0] for b in data.calib][: cfg["int8"]["calibration_batches"]]
        work.mkdir(exist_ok=True)
        for i, k in enumerate(todo, 1):
            _say(f"int8 {i}/{len(todo)}: {k}")
            model = io.load(files[k])
            info = export_int8(model, calib, work / f"{k}.onnx", method=cfg["int8"]["method"])
            metrics = task.test_metrics(OnnxModule(int8_path(work / f"{k}.onnx"), model), data, torch.device("cpu"))
            done[k] = {**metrics, "bytes": info["int8"]["bytes"], "float_nodes": info["int8"]["float_nodes"],
                       "sha256": hashes[k]}
            io.atomic_write_text(json.dumps({"settings": cfg["int8"], "results": done}, indent=1), cache)
    return done


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rows(cfg: dict, cells: list[dict], lat: dict[str, dict], base_metrics: dict, metric: str,
          int8: dict[str, dict]) -> list[dict]:
    rows = []
    keys = list(dict.fromkeys((c["label"], c["target"], c["budget"]) for c in cells))
    for label, target, budget in keys:
        group = [c for c in cells if (c["label"], c["target"], c["budget"]) == (label, target, budget)]
        ok = [c for c in group if c.get("metrics")]
        values = [c["metrics"]["after"][metric] for c in ok]
        mean, std = _mean_std(values)
        pruned = [c["metrics"]["pruned"][metric] for c in ok if c["metrics"].get("pruned")]
        macs = [base_metrics["macs"] / max(c["metrics"]["after"]["macs"], 1) for c in ok]
        row = {"method": label, "method_name": group[0]["method"], "target": target, "budget": budget,
               "distill": group[0]["distill"],
               "seeds": [c["seed"] for c in ok], "metric_mean": mean, "metric_std": std,
               "metric_per_seed": {str(c["seed"]): c["metrics"]["after"][metric] for c in ok},
               "pruned_metric_mean": _mean_std(pruned)[0],
               "macs_ratio": statistics.fmean(macs) if macs else None,
               "params": round(statistics.fmean(c["metrics"]["after"]["params"] for c in ok)) if ok else None,
               "latency": {}, "wall_s": statistics.fmean(c["metrics"]["wall_s"] for c in ok) if ok else None,
               "errors": {str(c["seed"]): c["error"] for c in group if c.get("error")},
               "options": group[0]["config"]["method"]["params"],
               "search_epochs": group[0]["search_charged"],
               "stages": [s["stage"] + (f" {s['epochs']}" if "epochs" in s else "")
                          for s in group[0]["config"]["stages"]]}
        if "mAP50" in base_metrics:
            m50 = [c["metrics"]["after"]["mAP50"] for c in ok]
            row["mAP50_mean"], row["mAP50_std"] = _mean_std(m50)
            row["mAP50_per_seed"] = {str(c["seed"]): c["metrics"]["after"]["mAP50"] for c in ok}
        q = [int8[c["id"]][metric] for c in ok if c["id"] in int8]
        if q:
            row["int8_metric_mean"], row["int8_metric_std"] = _mean_std(q)
            row["int8_per_seed"] = {str(c["seed"]): int8[c["id"]][metric] for c in ok if c["id"] in int8}
        for setting, per_model in lat.items():
            stats = [per_model[c["id"]]["ratio"] for c in ok if c["id"] in per_model]
            if stats:  # several seeds: the median of their medians, the widest spread
                med = statistics.median(s["median"] for s in stats)
                lo, hi = min(s["lo"] for s in stats), max(s["hi"] for s in stats)
                row["latency"][setting] = {"median": med, "lo": lo, "hi": hi, "within_noise": bool(lo <= 1 <= hi)}
        rows.append(row)
    _mark_best(rows)
    return rows


def _mark_best(rows: list[dict]) -> None:
    """The best row per (target, budget), and whether its lead over the runner-up exceeds both rows' seed spread."""
    for key in dict.fromkeys((r["target"], r.get("budget")) for r in rows):
        ranked = sorted((r for r in rows if (r["target"], r.get("budget")) == key and r["metric_mean"] is not None),
                        key=lambda r: -r["metric_mean"])
        for r in rows:
            if (r["target"], r.get("budget")) == key:
                r["best"], r["lead_beyond_spread"] = False, None
        if ranked:
            ranked[0]["best"] = True
            if len(ranked) > 1:
                a, b = ranked[0], ranked[1]
                ranked[0]["lead"] = a["metric_mean"] - b["metric_mean"]
                if min(len(a.get("seeds", [0, 1])), len(b.get("seeds", [0, 1]))) > 1:  # one seed has no spread
                    ranked[0]["lead_beyond_spread"] = bool(a["metric_mean"] - b["metric_mean"] > a["metric_std"] +
                                                           b["metric_std"])


def run(config: str | Path | dict, *, out: str | Path | None = None, force: bool = False,
        board_only: bool = False) -> dict:
    """Run (or resume) a compare; returns the leaderboard (also written to ``OUT/leaderboard.json``).
    ``board_only``: run nothing, and rank the cells finished so far (the rest count as not done)."""
    raw = copy.deepcopy(config) if isinstance(config, dict) else _read(config)
    if out is not None:
        if not str(out).strip():
            raise PrunekitError("--out is empty: give a folder for the compare")
        if isinstance(raw, dict):
            raw["out"] = str(out)
    cfg = validate(raw)
    out = Path(cfg["out"]).absolute()
    cfg = validate({**cfg, "out": str(out)})
    t0 = time.perf_counter()
    with io.run_lock(out):
        _claim(cfg, out, force)
        entries = _entries(cfg)
        cells = _cells(cfg, entries, out)
        _say(f"base: {out / 'base'}")
        base = _finished(_base_config(cfg, out)) if board_only else _run(_base_config(cfg, out), force)
        if base is None:
            raise PrunekitError(f"{out} has no finished base: run the compare without --board-only first")
        base_path = _base_model_path(cfg, out)
        _check_steps(cfg, cells, out)
        metric = base["metric"]
        for i, cell in enumerate(cells, 1):
            done = _finished(cell["config"])
            _say(f"cell {i}/{len(cells)} {cell['id']}" + (" (done)" if done else " (not run)" if board_only else ""))
            if board_only:
                cell["metrics"] = done
                if done:
                    cell["model_path"] = final_model_path(Path(cell["config"]["out"]))
                elif (out / "errors" / f"{cell['id']}.json").is_file():  # a failure recorded by an earlier run
                    cell["error"] = _json(out / "errors" / f"{cell['id']}.json").get("error", "failed")
                continue
            cell["metrics"] = _run_cell(cell, force, out)
            if cell["metrics"] is None:
                cell["error"] = json.loads((out / "errors" / f"{cell['id']}.json").read_text())["error"]
            else:
                cell["model_path"] = final_model_path(Path(cell["config"]["out"]))
        finished = [c for c in cells if c.get("metrics")]
        hashes = {"base": io.sha256_file(base_path)} | {c["id"]: io.sha256_file(c["model_path"]) for c in finished}
        for c in finished:
            _write_result(c, out, hashes)
        int8 = _int8(cfg, out, base_path, finished, hashes) if cfg.get("int8") else {}
        lat = _latency(cfg, out, base_path, finished, hashes) if cfg["latency"] is not False else {}
        board = {"name": cfg["name"], "task": base.get("task"), "metric": metric,
                 "metric_label": base.get("metric_label"), "budget": cfg["budget"], "budgets": _budgets(cfg),
                 "seeds": cfg["seeds"],
                 "base": {"checkpoint": str(base_path.relative_to(out)), "sha256": hashes["base"], **base["after"]},
                 "latency_settings": cfg["latency"], "cells": {"done": len(finished), "total": len(cells),
                                                               "failed": [c["id"] for c in cells if c.get("error")]},
                 "rows": _rows(cfg, cells, lat, base["after"], metric, int8),
                 "latency_base_ms": {k: v["base"]["median_ms"] for k, v in lat.items()},
                 **({"base_int8": {**int8["base"], "latency": {k: v["base"]["ratio"] for k, v in lat.items()
                                                               if k.startswith(_INT8_KEY)}}} if int8 else {}),
                 "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1)}
        io.atomic_write_text(json.dumps(board, indent=1), out / "leaderboard.json")
        md = table(board)
        io.atomic_write_text(md + "\n", out / "leaderboard.md")
        io.atomic_write_text(_html(board, md), out / "leaderboard.html")
    print(md)
    return board


def _portable(value: Any, out: Path) -> Any:
    """``value`` with the machine's absolute paths made relative (to the compare folder, else the working
    directory), so a committed result names no path of the machine that ran it."""
    if isinstance(value, dict):
        return {k: _portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, out) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        for root in (out, Path.cwd(), Path.cwd().parent):  # the last: data beside the checkout (../shared)
            if Path(value).is_relative_to(root):
                return os.path.relpath(value, Path.cwd() if root == Path.cwd().parent else root)
    return value


def _write_result(cell: dict, out: Path, hashes: dict[str, str]) -> None:
    """``OUT/results/<cell>.json``: what a leaderboard row is made of, small enough to commit (the cell's config,
    its metrics and the hashes of the models they were measured on; no model file, no absolute path)."""
    m = cell["metrics"]
    record = {"id": cell["id"], "method": cell["method"], "label": cell["label"], "target": cell["target"],
              "budget": cell["budget"], "search_charged": cell["search_charged"], "seed": cell["seed"],
              "config": cell["config"], "metric": m.get("metric"), "after": m.get("after"), "pruned": m.get("pruned"),
              "wall_s": m.get("wall_s"), "base_sha256": hashes["base"], "model_sha256": hashes[cell["id"]]}
    io.atomic_write_text(json.dumps(_portable(record, out), indent=1), out / "results" / f"{cell['id']}.json")


# ---- presenting ----
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def table(board: dict) -> str:
    """The leaderboard as Markdown (what ``prunekit compare`` prints): one table per budget, then the
    recommendation per target and budget."""
    from .timing import label

    settings = list(board["latency_base_ms"])
    detect = any("mAP50_mean" in r for r in board["rows"])
    q = board.get("base_int8")
    head = ["method", "target", "seeds", f"{board['metric_label'] or board['metric']} mean ± std", "pruned (no FT)",
            *(["mAP50 mean ± std"] if detect else []), *(["int8 mean ± std"] if q else []), "MACs ratio", "params",
            *settings, "wall s", ""]
    base = board["base"]
    budgets = board.get("budgets") or [board["budget"]]
    lines = [f"Base: {board['metric_label'] or board['metric']} {_fmt(base.get(board['metric']))}"
             + (f", mAP50 {_fmt(base.get('mAP50'))}" if detect else "")
             + f", {base['macs'] / 1e6:.2f}M MACs, {base['params']:,} params (sha256 {board['base']['sha256'][:12]}); "
             f"budget {', '.join(f'{b:g}' for b in budgets)} epochs after the base; cells {board['cells']['done']}/"
             f"{board['cells']['total']} done. Latency: base/pruned, median (interquartile range) of interleaved "
             "rounds."]
    if q:
        lines.append(f"int8 (ONNX Runtime static quantisation, metric measured on the int8 file; {_INT8_KEY[:-1]} "
                     "columns: speedup against the fp32 base on ONNX Runtime). The base quantised alone: "
                     f"{_fmt(q.get(board['metric']))}, "
                     + ", ".join(f"{k} {label(v)}" for k, v in q["latency"].items()))
    for budget in budgets:
        rows = [r for r in board["rows"] if r.get("budget", board["budget"]) == budget]
        if len(budgets) > 1:
            lines += ["", f"### Budget {budget:g} epochs" + (" (prune, BN statistics re-estimated, no gradient step)"
                                                             if budget == 0 else "")]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            mark = ""
            if r.get("best"):
                mark = "**best**" + ("" if r.get("lead_beyond_spread") is None else
                                     " (lead beyond spread)" if r["lead_beyond_spread"] else " (lead within spread)")
            if r["errors"]:
                mark += (" " if mark else "") + "failed: " + "; ".join(f"s{k}: {v}"
                                                                       for k, v in r["errors"].items())[:200]
            cells = [r["method"], r["target"], ",".join(map(str, r["seeds"])) or "–",
                     f"{_fmt(r['metric_mean'])} ± {_fmt(r['metric_std'])}" if r["metric_mean"] is not None else "–",
                     _fmt(r["pruned_metric_mean"]),
                     *([f"{_fmt(r.get('mAP50_mean'))} ± {_fmt(r.get('mAP50_std'))}"] if detect else []),
                     *([f"{_fmt(r.get('int8_metric_mean'))} ± {_fmt(r.get('int8_metric_std'))}"] if q else []),
                     _fmt(r["macs_ratio"]) + ("x" if r["macs_ratio"] else ""),
                     f"{r['params']:,}" if r["params"] else "–",
                     *[label(r["latency"].get(s, {})) for s in settings], _fmt(r["wall_s"], ".0f"), mark]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *recommend(board)])


def recommend(board: dict) -> list[str]:
    """Per target and budget, the method to use: the best row if its lead exceeds the seeds' spread, else the
    cheapest (least wall time) of the rows within the spread of the best."""
    out = []
    for target, budget in dict.fromkeys((r["target"], r.get("budget", board["budget"])) for r in board["rows"]):
        rows = [r for r in board["rows"] if (r["target"], r.get("budget", board["budget"])) == (target, budget)
                and r["metric_mean"] is not None]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["metric_mean"])
        where = f"Recommendation at {target}, budget {budget:g} epochs:"
        if len(rows) == 1:
            out.append(f"{where} {best['method']} (the only finished row)")
        elif best.get("lead_beyond_spread") is None:
            out.append(f"{where} {best['method']} is ahead by {best['lead']:.2f} points on a single seed: no spread "
                       "to judge the lead; run more seeds")
        elif best.get("lead_beyond_spread"):
            out.append(f"{where} use {best['method']}: it leads by {best['lead']:.2f} points, beyond the spread")
        else:
            level = [r for r in rows if best["metric_mean"] - r["metric_mean"] <= best["metric_std"] + r["metric_std"]]
            cheap = min(level, key=lambda r: r["wall_s"] or math.inf)
            out.append(f"{where} no method leads beyond the spread: use the cheapest, {cheap['method']} "
                       f"({_fmt(cheap['wall_s'], '.0f')} s per cell; {len(level)} rows level)")
    return out


def _plots(board: dict) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import png

    every = [r for r in board["rows"] if r["metric_mean"] is not None]
    rows = [r for r in every if r.get("budget", board["budget"]) == board["budget"]]  # the speed plots: one budget
    if not every:
        return []
    lat_key = next((k for k in ("ort_b1", "eager_b1") if k in board["latency_base_ms"]), None)
    figs = []
    for name, xkey, xlabel in (("metric-vs-macs", "macs_ratio", "MACs ratio (base / pruned)"),
                               ("metric-vs-latency", lat_key, f"measured latency ratio ({lat_key}, base / pruned)")):
        if xkey is None:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for r in rows:
            lat = r["latency"].get(xkey, {}) if xkey != "macs_ratio" else {}
            x = r["macs_ratio"] if xkey == "macs_ratio" else lat.get("median")
            if x is None:
                continue
            xerr = [[x - lat["lo"]], [lat["hi"] - x]] if lat else None  # the timing spread, as in the table
            ax.errorbar(x, r["metric_mean"], yerr=r["metric_std"] or 0, xerr=xerr, fmt="o", capsize=3,
                        label=f"{r['method']} @ {r['target']}")
        ax.axhline(board["base"][board["metric"]], color="k", ls="--", lw=1, label="base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {board['metric_label'] or board['metric']}")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{board['name']}: mean ± std over seeds")
        figs.append((name, png(fig)))
    budgets = sorted(board.get("budgets") or [board["budget"]])
    if len(budgets) > 1:  # where each method wins: the metric against the fine-tune budget, per target
        targets = list(dict.fromkeys(r["target"] for r in every))
        fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 3.8), squeeze=False)
        pos = {b: i for i, b in enumerate(budgets)}  # budgets evenly spaced: 0 and 0.25 stay readable
        for ax, target in zip(axes[0], targets, strict=True):
            for method in dict.fromkeys(r["method"] for r in every if r["target"] == target):
                pts = sorted((r["budget"], r["metric_mean"], r["metric_std"] or 0) for r in every
                             if (r["target"], r["method"]) == (target, method))
                ax.errorbar([pos[b] for b, _, _ in pts], [m for _, m, _ in pts], yerr=[e for _, _, e in pts],
                            fmt="o-", capsize=3, label=method)
            ax.axhline(board["base"][board["metric"]], color="k", ls="--", lw=1, label="base")
            ax.set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets])
            ax.set_xlabel("fine-tune budget (epochs after the base)")
            ax.set_ylabel(f"test {board['metric_label'] or board['metric']}")
            ax.set_title(f"{target}: mean ± std over seeds")
            ax.legend(fontsize=6)
        figs.append(("metric-vs-budget", png(fig)))
    return figs


def _html(board: dict, md: str) -> str:
    cells = lambda ln: [c.strip() for c in ln.strip("|").split(" | ")]  # noqa: E731
    parts, table_lines = [], []

    def flush() -> None:
        if table_lines:
            head, body = table_lines[0], table_lines[2:]
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in cells(ln))
                           + "</tr>" for ln in body)
            parts.append("<table class='leaderboard'><tr>" + "".join(f"<th>{html.escape(c)}</th>"
                                                                    for c in cells(head)) + f"</tr>{rows}</table>")
            table_lines.clear()

    for ln in md.splitlines()[1:]:
        if ln.startswith("|"):
            table_lines.append(ln)
            continue
        flush()
        if ln.startswith("### "):
            parts.append(f"<h2>{html.escape(ln[4:])}</h2>")
        elif ln.strip():
            parts.append(f"<p>{html.escape(ln)}</p>")
    flush()
    figs = "".join(f"<figure><img alt='{n}' src='data:image/png;base64,{base64.b64encode(b).decode()}'>"
                   f"<figcaption>{n}</figcaption></figure>" for n, b in _plots(board))
    title = f"prunekit compare — {html.escape(board['name'])}"
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
            f"<body><h1>{title}</h1><p>{html.escape(md.splitlines()[0])}</p>{''.join(parts)}{figs}</body></html>")
