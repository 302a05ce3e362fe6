"""Reports people can read: ``prunekit report RUN_DIR [RUN_DIR ...]``.

One self-contained HTML page (plots embedded as data URIs, no network) and the same content
as Markdown (plots as PNG files beside it): the before/after table, channels per layer
before/after, the |γ| histogram with the threshold for BN-based methods, the norm histogram of
one layer for dist-fit against l1-norm's pick, training curves, and for several runs the
metric against MACs. The run's task (``"task"`` in metrics.json) adds its own rows and figures (detection:
mAP50 beside mAP50-95, and validation images with the base's and the pruned model's boxes).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import io, methods, tasks, timing  # noqa: E402
from .errors import PrunekitError  # noqa: E402
from .plots import png  # noqa: E402
from .tasks import Task  # noqa: E402

ROWS = [  # the task's metric comes first (see _rows)
    ("parameters", "params", "{:,}"),
    ("non-zero parameters", "nonzero_params", "{:,}"),
    ("MACs", "macs", "{:,}"),
    ("size (bytes)", "size_bytes", "{:,}"),
    ("latency b1 (ms, 1 thread)", "latency_b1_ms", "{:.3f}"),
    ("latency b64 (ms, 1 thread)", "latency_b64_ms", "{:.2f}"),
    ("measured speedup b1", "speedup_b1", timing.label),
    ("measured speedup b64", "speedup_b64", timing.label),
    ("ONNX Runtime fp32 speedup b1", "ort_speedup_b1", timing.label),
    ("ONNX Runtime fp32 speedup b64", "ort_speedup_b64", timing.label),
    ("int8 size (bytes)", "int8_size_bytes", "{:,}"),
    ("int8 speedup b1 (vs fp32 base, ONNX Runtime)", "int8_speedup_b1", timing.label),
    ("int8 speedup b64 (vs fp32 base, ONNX Runtime)", "int8_speedup_b64", timing.label),
]


def _stage_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "stages").glob("*") if (p / "done.pt").exists())


def _load_run(run: Path) -> dict:
    if not (run / "metrics.json").exists():
        raise PrunekitError(f"{run} is not a finished prunekit run (no metrics.json); run `prunekit run` first")
    stages = []
    for d in _stage_dirs(run):
        rec = io.safe_load(d / "done.pt")
        stages.append({"dir": d, **rec})
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        ok = isinstance(metrics, dict) and all(isinstance(metrics.get(k), dict) for k in ("before", "after"))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise PrunekitError(f"{run / 'metrics.json'} is damaged (not the metrics a run writes); re-run the run with "
                            "--force to measure it again")
    log = []
    if (run / "log.jsonl").exists():
        for line in (run / "log.jsonl").read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(record, dict):
                log.append(record)
    return {"dir": run, "metrics": metrics, "stages": stages, "log": log}


def _channels_plot(run: dict) -> bytes | None:
    prunes = [s for s in run["stages"] if "prune" in s]
    if not prunes:
        return None
    first = prunes[0]["prune"]["channels"]
    path = prunes[-1]["dir"] / "model.pt"  # removed to save space: the final model has the same widths
    final = io.load(path if path.exists() else run["dir"] / "after.pt")
    position = {n: i for i, n in enumerate(dict(final.named_modules()))}
    names = sorted(first, key=lambda n: position.get(n, len(position)))
    before = [first[n][0] for n in names]
    mods = dict(final.named_modules())
    after = [getattr(mods.get(n), "out_channels", getattr(mods.get(n), "out_features", 0)) if n in mods else 0
             for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 3.2))
    idx = np.arange(len(names))
    ax.bar(idx, before, color="#c7d4e8", label="before")
    ax.bar(idx, after, color="#2f6db3", label="after")
    ax.set_xticks(idx, names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title("channels per coupled group (named by its first layer)")
    ax.legend()
    return png(fig)


def _task(run: dict) -> Task:
    return tasks.get(run["metrics"].get("task") or tasks.DEFAULT)


def _metric(run: dict) -> tuple[str, str]:
    """(key, label) of the task's metric the run recorded."""
    m, task = run["metrics"], _task(run)
    return m.get("metric", task.metric), m.get("metric_label", task.metric_label)


def _method_figures(run: dict) -> list[tuple[str, bytes]]:
    """The figures the run's method declares, drawn from its first prune stage's ``info``."""
    prunes = [s for s in run["stages"] if "prune" in s]
    name = run["metrics"].get("method")
    if not prunes or not name:
        return []
    method = methods.get(name)
    return method.figures(prunes[0]["prune"].get("info", {})) if method.figures else []


def _curves_plot(runs: list[dict]) -> bytes | None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for run in runs:
        key = f"val_{_metric(run)[0]}"
        epochs = [r for r in run["log"] if "epoch" in r and r.get(key) is not None]
        if epochs:
            ax.plot(range(1, len(epochs) + 1), [r[key] for r in epochs], marker=".",
                    label=run["metrics"]["name"])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch (all stages in order)")
    ax.set_ylabel(f"validation {_metric(runs[0])[1]} (held out of the training data)")
    ax.legend(fontsize=7)
    ax.set_title("training curves")
    return png(fig)


def _tradeoff_plot(runs: list[dict]) -> bytes | None:
    if len(runs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    key, label = _metric(runs[0])
    for run in runs:
        a = run["metrics"]["after"]
        ax.scatter(a["macs"] / 1e6, a[key], s=30)
        ax.annotate(run["metrics"]["name"], (a["macs"] / 1e6, a[key]), fontsize=7)
    b = runs[0]["metrics"]["before"]
    ax.scatter(b["macs"] / 1e6, b[key], marker="*", s=80, color="k", label="base")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel(f"test {label}")
    ax.legend(fontsize=7)
    ax.set_title("metric vs. MACs, one point per run")
    return png(fig)


def _table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["", "base"] + [r["metrics"]["name"] for r in runs]
    rows = []
    metric, metric_label = _metric(runs[0])
    task = _task(runs[0])
    for label, key, fmt in [(f"test {metric_label}", metric, task.metric_format), *task.report_rows,
                            (f"int8 test {metric_label} (the int8 file run)", f"int8_{metric}", task.metric_format),
                            *ROWS]:
        values = [runs[0]["metrics"]["before"].get(key), *(r["metrics"]["after"].get(key) for r in runs)]
        if any(v is not None for v in values):
            show = fmt if callable(fmt) else fmt.format
            rows.append([label, *("–" if v is None else show(v) for v in values)])
    return header, rows


def _stages_table(run: dict) -> tuple[list[str], list[list[str]]]:
    """One row per finished stage: what each stage cost or won (validation metric as the stage recorded it)."""
    from .measure import count_macs, count_params

    key, label = _metric(run)
    header = ["stage", "epochs", f"val {label}", "parameters", "MACs"]
    rows = []
    for st in run["stages"]:
        path = st["dir"] / "model.pt"
        model = io.load(path) if path.exists() else None  # a stage model removed to save space
        shape = (getattr(model, "prunekit_arch", None) or {}).get("input_shape")
        macs = count_macs(model, torch.zeros(1, *shape)) if shape else None
        metric = st.get("metric")
        rows.append([st["dir"].name, str(st.get("epochs", "–")), "–" if metric is None else f"{metric:.2f}",
                     "–" if model is None else f"{count_params(model):,}", "–" if macs is None else f"{macs:,}"])
    return header, rows


def _file_name(name: Any) -> str:
    """A run's name as a file name inside the report folder: no separators, no leading dots, bounded."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)).lstrip(".")[:80] or "run"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md for one run (into it) or several (into ``out``)."""
    runs = [_load_run(Path(d)) for d in run_dirs]
    out = Path(out) if out else runs[0]["dir"] if len(runs) == 1 else runs[0]["dir"].parent / "report-compare"
    out.mkdir(parents=True, exist_ok=True)
    title = "prunekit report — " + ", ".join(r["metrics"]["name"] for r in runs)
    plots: list[tuple[str, bytes]] = []
    notes: list[str] = []
    for r in runs:
        own = _task(r).report_figures(r)  # the task's figures (detection: boxes on validation images)
        notes += [f"{r['metrics']['name']}: {why}" for _, _, why in own if why]
        figures = [("channels", _channels_plot(r)), *_method_figures(r), *((n, fig) for n, fig, _ in own)]
        plots += [(f"{_file_name(r['metrics']['name'])}-{label}", fig) for label, fig in figures if fig]
    for label, fig in (("curves", _curves_plot(runs)), ("tradeoff", _tradeoff_plot(runs))):
        if fig:
            plots.append((label, fig))
    header, rows = _table(runs)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    md = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    note = ("base: the model before any sparsity training or pruning; latency: base and pruned model timed side by "
            "side on the CPU (eager PyTorch, one thread, after warm-up, interleaved rounds); measured speedup: the "
            "median of the per-round ratios with their interquartile range, 'within noise' when that range holds 1")
    md += ["", f"Test split; {note}.", ""]
    body = [f"<h1>{html.escape(title)}</h1>", "<table id='summary'>",
            "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    body.append(f"</table><p>Test split; {html.escape(note)}.</p>")
    for r in runs:
        sh, srows = _stages_table(r)
        if not srows:
            continue
        name = r["metrics"]["name"]
        md += [f"## Stages of {name}", "", "| " + " | ".join(sh) + " |", "|" + "---|" * len(sh)]
        md += ["| " + " | ".join(row) + " |" for row in srows] + [""]
        body.append(f"<h2>Stages of {html.escape(str(name))}</h2><table class='stages'><tr>"
                    + "".join(f"<th>{html.escape(h)}</th>" for h in sh) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in srows)
                    + "</table>")
    for note in notes:
        md += [f"Note: {note}", ""]
        body.append(f"<p class='note'>Note: {html.escape(note)}</p>")
    for name, image in plots:
        (files / f"{name}.png").write_bytes(image)
        md.append(f"![{name}](report_files/{name}.png)")
        md.append("")
        uri = "data:image/png;base64," + base64.b64encode(image).decode()
        body.append(f"<figure><img alt='{html.escape(name)}' src='{uri}'><figcaption>{html.escape(name)}"
                    "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page)
    md_path.write_text("\n".join(md) + "\n")
    return html_path, md_path

