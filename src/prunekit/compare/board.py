"""The leaderboard: rows per (method, target, budget), the best mark, the recommendation, Markdown and HTML."""

from __future__ import annotations

import base64
import html
import statistics

from .config import _INT8_KEY


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
               "latency": {}, "wall_s": _wall(ok),
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


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def table(board: dict) -> str:
    """The leaderboard as Markdown (what ``prunekit compare`` prints): one table per budget, then the
    recommendation per target and budget."""
    from ..timing import label

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


def _wall(cells: list[dict]) -> float | None:
    """A row's mean seconds per cell; None if none finished or a cell's seconds are not known (its stages ran
    before prunekit recorded stage times)."""
    walls = [c["metrics"].get("wall_s") for c in cells]
    return statistics.fmean(walls) if walls and None not in walls else None


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
            unknown = [r["method"] for r in level if r["wall_s"] is None]
            if unknown:
                out.append(f"{where} no method leads beyond the spread ({len(level)} rows level); the cheapest is not "
                           f"known: no wall time for {', '.join(unknown)}")
                continue
            cheap = min(level, key=lambda r: r["wall_s"])
            out.append(f"{where} no method leads beyond the spread: use the cheapest, {cheap['method']} "
                       f"({_fmt(cheap['wall_s'], '.0f')} s per cell; {len(level)} rows level)")
    return out


def _plots(board: dict) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import png

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
