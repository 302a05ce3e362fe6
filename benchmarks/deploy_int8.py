"""Prune + int8 on the CPU runtime that serves the model (issue 35): every model exported fp32 and int8,
each file's metric measured by running that file on the test split, and all files timed side by side in
one set of interleaved rounds against the fp32 base on ONNX Runtime.

    python benchmarks/deploy_int8.py --base BASE.pt --model LABEL=PRUNED.pt ... --data cifar10 \\
        --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz --out benchmarks/results/deploy-int8-resnet20

Calibration: --calibration-batches batches of the training split (the first, in the task's fixed seeded order).
Writes OUT/table.json (with each model file's sha256) and OUT/table.md; ONNX files go under --work (ignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from prunekit import io, tasks
from prunekit.export import deploy_table, export_int8
from prunekit.files import sha256_file
from prunekit.timing import label


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--data", required=True)
    p.add_argument("--data-root")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--batches", default="1,64", help="batch sizes timed")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/deploy-int8")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    files = {"base": Path(args.base)} | {k: Path(v) for k, v in (m.split("=", 1) for m in args.model)}
    loaded = {k: io.load(v) for k, v in files.items()}
    task = tasks.for_model(loaded["base"])
    spec = {"name": args.data, "calibration_batches": args.calibration_batches}
    if args.data_root:
        spec["root"] = args.data_root
    if task.name == "detect":
        from prunekit.yolo import input_size

        spec["image_size"] = input_size(loaded["base"])
    data = task.load_data(spec, seed=0, split_seed=0, device=torch.device("cpu"))
    calib = [b[0] for b in data.calib][: args.calibration_batches]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, model in loaded.items():
        info[name] = export_int8(model, calib, work / f"{name}.onnx")
        print(f"exported {name}", file=sys.stderr, flush=True)
    batches = [int(v) for v in args.batches.split(",")]
    table = deploy_table({n: (m, work / f"{n}.onnx") for n, m in loaded.items()}, data, task, batch_sizes=batches,
                         threads=args.threads, rounds=args.rounds)
    cpu = torch.device("cpu")
    rows = {n: {"file": str(files[n]), "sha256": sha256_file(files[n]), "pytorch": task.test_metrics(m, data, cpu),
                **table[n], "float_nodes": info[n]["int8"]["float_nodes"],
                "calibration_images": info[n]["int8"]["calibration_images"]} for n, m in loaded.items()}
    timing = table["latency"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/deploy_int8.py " + " ".join(sys.argv[1:])
    result = {"command": cmd, "task": task.name, "metric": task.metric, "threads": args.threads,
              "rounds": args.rounds, "calibration": f"{args.calibration_batches} training batches, minmax, U8S8 QDQ",
              "models": rows, "latency": timing}
    (out / "table.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(_markdown(result))
    print((out / "table.md").read_text())
    return 0


def _markdown(r: dict) -> str:
    metrics = [m for m in r["models"]["base"]["int8"]]
    lines = [f"`{r['command']}`", "",
             f"Speedups: median per-round ratio against the fp32 base on ONNX Runtime ({r['threads']} threads, "
             f"{r['rounds']} interleaved rounds), interquartile range in brackets.", ""]
    head = ["model", "format", *metrics, "MB", *(f"speedup {b}" for b in r["latency"])]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in r["models"].items():
        for kind in ("fp32", "int8"):
            cells = [name, kind, *(f"{row[kind][m]:.2f}" for m in metrics), f"{row[f'{kind}_bytes'] / 1e6:.2f}",
                     *(label(r["latency"][b][f"{name}/{kind}"]["ratio"]) for b in r["latency"])]
            lines.append("| " + " | ".join(cells) + " |")
    groups: dict[str, list[str]] = {}
    for name in r["models"]:
        groups.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    lines += ["", "Mean over seeds (models named LABEL-sN): metric ± std, speedup median of the seeds' medians", ""]
    for g, names in groups.items():
        for kind in ("fp32", "int8"):
            vals = [r["models"][n][kind][r["metric"]] for n in names]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            sp = {b: statistics.median(r["latency"][b][f"{n}/{kind}"]["ratio"]["median"] for n in names)
                  for b in r["latency"]}
            lines.append(f"- {g} {kind} ({len(names)}): {r['metric']} {statistics.fmean(vals):.2f} ± {sd:.2f}; "
                         + ", ".join(f"{b} {v:.2f}x" for b, v in sp.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
