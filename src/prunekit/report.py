"""Reports people can read: ``prunekit report RUN_DIR [RUN_DIR ...]``.

One self-contained HTML page (plots embedded as data URIs, no network) and the same content
as Markdown (plots as PNG files beside it): the before/after table, channels per layer
before/after, the |γ| histogram with the threshold for BN-based methods, the norm histogram of
one layer for dist-fit against l1-norm's pick, training curves, and for several runs the
metric against MACs.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import io  # noqa: E402
from .errors import PrunekitError  # noqa: E402

ROWS = [
    ("top-1 (%)", "top1", "{:.2f}"),
    ("parameters", "params", "{:,}"),
    ("non-zero parameters", "nonzero_params", "{:,}"),
    ("MACs", "macs", "{:,}"),
    ("size (bytes)", "size_bytes", "{:,}"),
    ("latency b1 (ms, 1 thread)", "latency_b1_ms", "{:.3f}"),
    ("latency b64 (ms, 1 thread)", "latency_b64_ms", "{:.2f}"),
]


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _stage_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "stages").glob("*") if (p / "done.pt").exists())


def _load_run(run: Path) -> dict:
    if not (run / "metrics.json").exists():
        raise PrunekitError(f"{run} is not a finished prunekit run (no metrics.json); run `prunekit run` first")
    stages = []
    for d in _stage_dirs(run):
        rec = io.safe_load(d / "done.pt")
        stages.append({"dir": d, **rec})
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").exists() else []
    return {"dir": run, "metrics": json.loads((run / "metrics.json").read_text()), "stages": stages, "log": log}


def _channels_plot(run: dict) -> bytes | None:
    prunes = [s for s in run["stages"] if "prune" in s]
    if not prunes:
        return None
    first = prunes[0]["prune"]["channels"]
    final = io.load(prunes[-1]["dir"] / "model.pt")
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
    return _png(fig)


def _gamma_plot(run: dict) -> bytes | None:
    """Histogram of log10|γ| before the first prune, with the threshold (and fitted mixture if any)."""
    prunes = [s for s in run["stages"] if "prune" in s]
    if not prunes:
        return None
    info = dict(prunes[0]["prune"].get("info", {}))
    fit = info.get("channel_fit")
    if fit and fit.get("samples"):  # adaptive-slim: the learned two-component fit and its cut
        info = {"gamma_log10": fit["samples"], "threshold_log10": fit.get("cut"),
                "components": {k: fit[k] for k in ("weights", "means", "stds")} if fit.get("weights") else None}
    if "gamma_log10" not in info:
        return None
    vals = np.asarray(info["gamma_log10"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(vals, bins=60, density=True, color="#9bb7d4", label="log10 |γ| (all prunable channels)")
    if info.get("components"):
        xs = np.linspace(vals.min(), vals.max(), 300)
        comp = info["components"]
        for i, (w, mu, sd) in enumerate(zip(comp["weights"], comp["means"], comp["stds"], strict=True)):
            dens = w * np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
            ax.plot(xs, dens, label=f"component {i + 1}")
    if info.get("threshold_log10") is not None:
        ax.axvline(info["threshold_log10"], color="crimson", ls="--", label=f"threshold {info['threshold_log10']:.2f}")
    ax.set_xlabel("log10 |γ|")
    ax.legend(fontsize=7)
    ax.set_title("BN scale factors and the pruning threshold" if info.get("threshold_log10") is not None
                 else "BN scale factors: no threshold learned (unimodal, nothing pruned)")
    return _png(fig)


def _norms_plot(run: dict) -> bytes | None:
    """dist-fit: one layer's norm histogram, kept by dist-fit vs. kept by l1-norm (largest norms)."""
    prunes = [s for s in run["stages"] if "prune" in s]
    if not prunes or "norms" not in prunes[0]["prune"].get("info", {}):
        return None
    norms = prunes[0]["prune"]["info"]["norms"]
    name = max(norms, key=lambda n: len(norms[n]["norms"]) - len(norms[n]["kept"]))
    all_n = np.asarray(norms[name]["norms"])
    k = len(norms[name]["kept"])
    fit = all_n[norms[name]["kept"]]
    l1 = np.sort(all_n)[-k:]
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8), sharex=True, sharey=True)
    bins = np.linspace(all_n.min(), all_n.max(), 16)
    for ax, vals, title in zip(axes, (all_n, fit, l1), (f"original ({len(all_n)})", f"dist-fit keeps {k}",
                                                         f"l1-norm keeps {k}"), strict=True):
        ax.hist(vals, bins=bins, color="#2f6db3")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"filter norms of {name}", fontsize=10, y=1.06)
    return _png(fig)


def _curves_plot(runs: list[dict]) -> bytes | None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for run in runs:
        epochs = [r for r in run["log"] if "epoch" in r and r.get("val_top1") is not None]
        if epochs:
            ax.plot(range(1, len(epochs) + 1), [r["val_top1"] for r in epochs], marker=".",
                    label=run["metrics"]["name"])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch (all stages in order)")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=7)
    ax.set_title("training curves")
    return _png(fig)


def _tradeoff_plot(runs: list[dict]) -> bytes | None:
    if len(runs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for run in runs:
        a = run["metrics"]["after"]
        ax.scatter(a["macs"] / 1e6, a["top1"], s=30)
        ax.annotate(run["metrics"]["name"], (a["macs"] / 1e6, a["top1"]), fontsize=7)
    b = runs[0]["metrics"]["before"]
    ax.scatter(b["macs"] / 1e6, b["top1"], marker="*", s=80, color="k", label="base")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7)
    ax.set_title("metric vs. MACs, one point per run")
    return _png(fig)


def _table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["", "base"] + [r["metrics"]["name"] for r in runs]
    rows = []
    for label, key, fmt in ROWS:
        base = runs[0]["metrics"]["before"].get(key)
        cells = [label, fmt.format(base) if base is not None else "–"]
        cells += [fmt.format(r["metrics"]["after"][key]) if r["metrics"]["after"].get(key) is not None else "–"
                  for r in runs]
        rows.append(cells)
    return header, rows


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md for one run (into it) or several (into ``out``)."""
    runs = [_load_run(Path(d)) for d in run_dirs]
    out = Path(out) if out else runs[0]["dir"] if len(runs) == 1 else runs[0]["dir"].parent / "report-compare"
    out.mkdir(parents=True, exist_ok=True)
    title = "prunekit report — " + ", ".join(r["metrics"]["name"] for r in runs)
    plots: list[tuple[str, bytes]] = []
    for r in runs:
        for label, fn in (("channels", _channels_plot), ("gamma", _gamma_plot), ("norms", _norms_plot)):
            png = fn(r)
            if png:
                plots.append((f"{r['metrics']['name']}-{label}", png))
    for label, png in (("curves", _curves_plot(runs)), ("tradeoff", _tradeoff_plot(runs))):
        if png:
            plots.append((label, png))
    header, rows = _table(runs)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    md = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "Latency: median of timed CPU runs at one thread after warm-up (`prunekit.measure`).", ""]
    body = [f"<h1>{html.escape(title)}</h1>", "<table id='summary'>",
            "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    body.append("</table><p>Latency: median of timed CPU runs at one thread after warm-up.</p>")
    for name, png in plots:
        (files / f"{name}.png").write_bytes(png)
        md.append(f"![{name}](report_files/{name}.png)")
        md.append("")
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
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

