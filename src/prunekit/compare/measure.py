"""What a compare measures beside each cell's own metrics: latency side by side, and the int8 column."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import io, runtimes, tasks
from ..errors import PrunekitError
from .config import INT8_RUNTIME, _base_config, _say


def _latency(cfg: dict, out: Path, base_path: Path, cells: list[dict], hashes: dict[str, str]) -> dict[str, dict]:
    """Every finished cell's final model timed side by side with the base; cached until a model changes
    (``hashes``: the sha256 of each model file, by cell id and ``base``)."""
    from .. import timing

    files = {"base": base_path} | {c["id"]: c["model_path"] for c in cells}
    settings = cfg["latency"]
    cache = out / "latency.json"
    old = io.read_signed_json(cache)  # signed: a hand-edited time is measured again, never shown
    if old.get("settings") == settings and old.get("models") == hashes and _latency_shape(old.get("results"), files):
        return old["results"]
    if cache.exists():
        _say(f"{cache} is stale, damaged, edited or for other models: measuring again")
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
    io.write_signed_json({"settings": settings, "models": hashes, "results": results}, cache)
    return results


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
    from ..export import export_int8, int8_path
    from ..runtimes.ort import OnnxModule

    files = {"base": base_path} | {c["id"]: c["model_path"] for c in cells}
    cache, work = out / "int8.json", out / "int8"
    old = io.read_signed_json(cache)
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
            io.write_signed_json({"settings": cfg["int8"], "results": done}, cache)
    return done
