"""A compare config: its keys, checked all at once, and the cells (pipeline configs) it consists of."""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .. import distill, io, methods, pipeline, runtimes, tasks
from .. import targets as T
from ..errors import PrunekitError
from ..options import POSITIVE, SEED, Field, Schema, check_section
from ..runtimes.ort_int8 import CALIBRATION_METHODS

KEYS = {"name": str, "out": str, "task": str, "device": str, "data": dict, "base": dict, "methods": list,
        "targets": list, "seeds": list, "budget": Field((int, float), minimum=0), "budgets": list,
        "finetune": dict, "sparsify": dict, "latency": (dict, bool), "distill": list, "int8": (dict, bool)}
INT8_KEYS = {"calibration_batches": POSITIVE, "method": Field(str, choices=CALIBRATION_METHODS)}
INT8_DEFAULTS = {"calibration_batches": 16, "method": "minmax"}
INT8_RUNTIME = "onnxruntime-int8"
_INT8_KEY = runtimes.RUNTIMES[INT8_RUNTIME].key + "_"  # its latency columns: speedup against the fp32 base
BASE_KEYS = {"checkpoint": str, "model": dict, "train": dict, "seed": SEED}
ENTRY_KEYS = {"name": str, "label": str, "params": dict, "targets": list, "budgets": list, "sparsify": (dict, bool),
              "stages": list, "search_epochs": Field(int, minimum=0)}
LATENCY_KEYS = {"batch": POSITIVE, "threads": POSITIVE, "rounds": POSITIVE, "runtimes": list}
LATENCY_DEFAULTS = {"batch": 64, "threads": 2, "rounds": 15, "runtimes": list(runtimes.DEFAULT)}
SPARSIFY_EPOCHS = 1  # a method's sparsity training when the config does not say (it counts against the budget)
RECALIBRATE = 20  # budget 0: calibration batches of the training split that re-estimate BN statistics
LEARNED = "learned"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def _err(key: str, msg: str) -> PrunekitError:
    return PrunekitError(f"compare config error at '{key}': {msg}")


def _check_keys(section: Any, allowed: Schema, where: str) -> None:
    """A section against its declared schema; a key written with no value is refused too."""
    check_section(section, allowed, where, _err, nulls=False)


def _pipeline_target(t: float | str | dict) -> dict:
    """A compare target as a pipeline's ``target``; a latency target with prune's timing defaults filled in."""
    if isinstance(t, dict):
        return {"runtime": "eager", "batch": 64, "threads": 2, **t}
    return {"learned": True} if t == LEARNED else {"speedup": float(t)}


def _target_name(t: float | str | dict) -> str:
    return T.name(_pipeline_target(t))


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
        if not m.kind.removes_channels:
            raise _err(f"{where}.name", f"{m.name} is {m.kind.name} ({m.kind.shows}, no speedup): compare ranks "
                                        "channel pruning by speedup; benchmark it with a pipeline instead")
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
            try:
                T.check_kind(m, _pipeline_target(t))  # its value is checked with the cell's pipeline config
            except T.TargetError as exc:
                raise _err(f"{where}.targets" if "targets" in e else "targets",
                           f"{exc.reason}: give this entry its own targets") from exc
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
    return plan(cfg)[0]


def _check(cfg: Any) -> dict:
    """The compare config's own keys checked, paths made absolute, defaults filled in."""
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
    seeds = cfg["seeds"]
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2 ** 32 for s in seeds):
        raise _err("seeds", f"must be a non-empty list of integers in [0, 2^32), got {str(seeds)[:80]}")
    if len(set(seeds)) != len(seeds):
        raise _err("seeds", "a seed appears twice")
    _check_budgets(_budgets(cfg), "budgets")
    _check_targets(cfg["targets"], "targets")
    if cfg.get("latency") is True:
        raise _err("latency", "a mapping of timing settings, or false to time nothing")
    lat = False if cfg.get("latency") is False else {**LATENCY_DEFAULTS, **(cfg.get("latency") or {})}
    if lat is not False:
        _check_keys(lat, LATENCY_KEYS, "latency")
        if not lat["runtimes"] or set(lat["runtimes"]) - set(runtimes.names()):
            raise _err("latency.runtimes", f"a non-empty list of {', '.join(runtimes.names())}")
    q: dict | bool = False
    if cfg.get("int8") not in (None, False):
        q = {**INT8_DEFAULTS, **(cfg["int8"] if isinstance(cfg["int8"], dict) else {})}
        _check_keys(q, INT8_KEYS, "int8")
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
    return cfg


def plan(raw: Any) -> tuple[dict, dict, list[dict]]:
    """A compare config checked, with its base and every cell as pipeline configs, each validated once here
    (``checked``: what the pipeline runs; ``config``: what the cell's result records): all before any work."""
    cfg = _check(raw)
    out = Path(cfg["out"])
    task = _task(cfg)  # once: for a checkpoint base it reads the file
    base = pipeline.validate(_base_config(cfg, out, task))
    cells = _cells(cfg, _entries(cfg), out, task)
    for cell in cells:
        try:
            cell["checked"] = pipeline.validate(copy.deepcopy(cell["config"]))
        except PrunekitError as exc:
            raise PrunekitError(f"compare cell {cell['id']}: {exc}") from exc
    return cfg, base, cells


def load_config(path: str | Path) -> dict:
    """Read a compare config and check it, its cells included."""
    return validate(_read(path))


def _read(path: str | Path) -> Any:
    return io.read_yaml(path, "compare config")


# ---- the runs a compare consists of ----
def _task(cfg: dict) -> str:
    """The task every run gets: the config's, else the one the base model's name (or checkpoint) belongs to;
    written into every run's config, so no run reads the base checkpoint again to find it."""
    if cfg.get("task"):
        return cfg["task"]
    base = cfg["base"]
    name = (base.get("model") or {}).get("name") or (io.recorded_name(base["checkpoint"]) if base.get("checkpoint")
                                                     else None)
    return tasks.for_name(name).name if name else tasks.DEFAULT


def _data(cfg: dict) -> dict:
    """The data section every run gets: one held-out split, fixed by the base's seed."""
    return {**cfg["data"], "split_seed": cfg["base"]["seed"]}


def _base_config(cfg: dict, out: Path, task: str | None = None) -> dict:
    """The base as a pipeline run: its train stage (0 epochs for a checkpoint, which only measures it)."""
    b = cfg["base"]
    model = {"checkpoint": b["checkpoint"]} if b.get("checkpoint") else b["model"]
    train = {**(b.get("train") or {}), "stage": "train"} if b.get("model") else {"stage": "train", "epochs": 0}
    return {"name": "base", "model": model, "data": _data(cfg), "seed": b["seed"], "device": cfg["device"],
            "out": str(out / "base"), "stages": [train], "task": task or _task(cfg)}


def _base_model_path(cfg: dict, out: Path) -> Path:
    return out / "base" / "stages" / "01-train" / "model.pt"


def _cells(cfg: dict, entries: list[dict], out: Path, task: str | None = None) -> list[dict]:
    """Every (budget, seed, method, target) cell as a pipeline config, cheapest budget first and then seed-major,
    so a partial compare has whole budgets and whole seeds."""
    cells = []
    ft = dict(cfg.get("finetune") or {})
    given = cfg.get("distill") or [None]
    kd = [v for v in given if v is not None]
    variants = [(v, "" if v is None else "+kd" if len(kd) == 1 else f"+kd{kd.index(v) + 1}") for v in given]
    task = task or _task(cfg)
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
                      "stages": stages, "task": task}
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


def _say(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)
