"""Issue 23's result files from a finished compare: one row per cell, with and without distillation.

A compare already holds everything the recovery goals ask for (the base's and each cell's test metrics,
the MACs count, every model timed side by side with the base); this writes it in the issue's row format:

    python benchmarks/recover_rows.py runs/compare-bccd-yolov8n-recover \\
        --command "prunekit compare benchmarks/compare/yolov8n-bccd-recover-cpu.yaml" \\
        --out benchmarks/results/recover-bccd-yolov8n.json

Detection rows: ``seed``, ``method``, ``recipe``, ``macs_ratio``, ``ort_b1_speedup`` (median of the
side-by-side rounds, with ``ort_b1_spread``), ``base_map50``, ``map50``, ``base_map50_95``, ``map50_95``.
Classification rows: ``seed``, ``method``, ``distill``, ``top1``, ``base_top1`` (and the same cost columns).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import yaml


def rows(out: Path, command: str) -> list[dict]:
    board = json.loads((out / "leaderboard.json").read_text())
    lat = json.loads((out / "latency.json").read_text())["results"] if (out / "latency.json").exists() else {}
    result = []
    for cell in sorted((out / "cells").iterdir()):
        if not (cell / "metrics.json").exists():
            continue
        m = json.loads((cell / "metrics.json").read_text())
        cfg = yaml.safe_load((cell / "config.yaml").read_text())
        kd = next((s["distill"] for s in cfg["stages"] if s.get("distill")), None)
        before, after = m["before"], m["after"]
        row = {"seed": cfg["seed"], "method": cfg["method"]["name"], "distill": kd is not None,
               "recipe": {"target": cfg["target"], "stages": cfg["stages"], "budget": cfg["budget"]},
               "macs_ratio": before["macs"] / after["macs"]}
        ort = (lat.get("ort_b1") or {}).get(cell.name)
        if ort:
            row["ort_b1_speedup"] = ort["ratio"]["median"]
            row["ort_b1_spread"] = [ort["ratio"]["lo"], ort["ratio"]["hi"]]
        if m["task"] == "detect":
            row.update(base_map50=before["mAP50"], map50=after["mAP50"], base_map50_95=before["mAP50-95"],
                       map50_95=after["mAP50-95"])
        else:
            row.update(top1=after["top1"], base_top1=before["top1"])
        row.update(cell=cell.name, base_sha256=board["base"]["sha256"], command=command,
                   date=datetime.date.today().isoformat())
        result.append(row)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_out", type=Path, help="a compare's out folder (with leaderboard.json)")
    ap.add_argument("--command", required=True, help="the command that ran the compare (recorded in each row)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    table = rows(args.compare_out, args.command)
    args.out.write_text(json.dumps(table, indent=1))
    print(f"{len(table)} rows -> {args.out}")


if __name__ == "__main__":
    main()
