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

import copy
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import io, pipeline
from ..errors import PrunekitError
from .board import _html, _rows, recommend, table
from .board import _mark_best as _mark_best  # re-exported: tests rank rows directly
from .config import _INT8_KEY, _base_model_path, _budgets, _check_steps, _read, _say, load_config, plan, validate
from .config import RECALIBRATE as RECALIBRATE
from .config import _base_config as _base_config
from .config import _cells as _cells
from .config import _entries as _entries
from .measure import _int8, _latency

__all__ = ["RECALIBRATE", "final_model_path", "load_config", "recommend", "run", "table", "validate"]


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


def _finished(checked: dict) -> dict | None:
    """A pipeline run's metrics if it finished with this very (validated) config (read, not re-measured), else
    None."""
    return pipeline.finished_metrics(Path(checked["out"]), checked)


def _run(checked: dict, force: bool, shared: Path | None = None) -> dict:
    return _finished(checked) or pipeline.execute(copy.deepcopy(checked), force=force, shared=shared)


def _run_cell(cell: dict, force: bool, out: Path) -> dict | None:
    """Run (or resume) one cell; a failure is recorded and returned as None so the others go on. Cells of one
    seed whose methods share a sparsity regulariser train that stage once (``OUT/shared``)."""
    errors_dir = out / "errors"
    err_path = errors_dir / f"{cell['id']}.json"
    try:
        metrics = _run(cell["checked"], force, out / "shared")
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
    if isinstance(raw, dict) and isinstance(raw.get("out"), str) and raw["out"].strip():
        raw["out"] = str(Path(raw["out"]).absolute())  # the folder is named by its absolute path
    cfg, base_cfg, cells = plan(raw)
    out = Path(cfg["out"])
    t0 = time.perf_counter()
    with io.run_lock(out):
        _claim(cfg, out, force)
        _say(f"base: {out / 'base'}")
        base = _finished(base_cfg) if board_only else _run(base_cfg, force)
        if base is None:
            raise PrunekitError(f"{out} has no finished base (a metrics.json written before prunekit signed its "
                                  "measurements, or edited since, counts as unfinished): run the compare without "
                                  "--board-only to measure it")
        base_path = _base_model_path(cfg, out)
        _check_steps(cfg, cells, out)
        metric = base["metric"]
        for i, cell in enumerate(cells, 1):
            done = _finished(cell["checked"])
            _say(f"cell {i}/{len(cells)} {cell['id']}" + (" (done)" if done else " (not run)" if board_only else ""))
            if board_only:
                cell["metrics"] = done
                if done:
                    cell["model_path"] = final_model_path(Path(cell["config"]["out"]))
                elif (out / "errors" / f"{cell['id']}.json").is_file():  # a failure recorded by an earlier run
                    cell["error"] = io.read_json_mapping(out / "errors" / f"{cell['id']}.json").get("error", "failed")
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
