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
import math
import sys
from pathlib import Path

import yaml

from .. import io
from ..errors import PrunekitError
from ..train import dist_info
from .config import (
    CYCLE_KEYS,
    DATA_KEYS,
    EXPORT_KEYS,
    LATENCY_KEYS,
    METHOD_KEYS,
    MODEL_KEYS,
    REST,
    STAGES,
    TARGET_KEYS,
    TOP_KEYS,
    load_config,
    validate,
)
from .final import LATENCY
from .runner import Run

__all__ = ["CYCLE_KEYS", "DATA_KEYS", "EXPORT_KEYS", "LATENCY", "LATENCY_KEYS", "METHOD_KEYS", "MODEL_KEYS", "REST",
           "STAGES", "TARGET_KEYS", "TOP_KEYS", "Run", "execute", "finished_metrics", "load_config", "run",
           "validate"]


def run(config: str | Path | dict, *, force: bool = False, out: str | Path | None = None,
        shared: str | Path | None = None) -> dict:
    """Run (or resume) the pipeline a config describes; returns the final metrics.

    The run directory has one writer at a time (``io.run_lock``); under torchrun, rank 0 holds it.
    ``shared``: a folder where a leading sparsity stage is looked up and published (``compare`` passes one).
    """
    cfg = load_config(config) if not isinstance(config, dict) else validate(copy.deepcopy(config))
    return execute(cfg, force=force, out=out, shared=shared)


def execute(cfg: dict, *, force: bool = False, out: str | Path | None = None,
            shared: str | Path | None = None) -> dict:
    """``run`` for a config ``validate`` returned (a compare validates each of its cells once, up front)."""
    shared = Path(shared).absolute() if shared is not None else None
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
    """The metrics of a run that finished with this config, else None (also when metrics.json was changed since
    this machine's prunekit signed it: a hand-edited number is measured again, never shown as measured)."""
    try:
        if yaml.safe_load((run_dir / "config.yaml").read_text()) != cfg:
            return None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    metrics = io.read_signed_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict):
        return None
    key = metrics.get("metric")
    number = lambda side: isinstance(side, dict) and isinstance(side.get(key), int | float) \
        and not isinstance(side.get(key), bool) and math.isfinite(side[key])  # noqa: E731
    return metrics if isinstance(key, str) and number(metrics.get("after")) and number(metrics.get("before")) else None
