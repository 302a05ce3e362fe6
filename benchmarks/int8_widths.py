"""Speed potential of prune + int8 by kept widths (issue 35): the base pruned by l1-norm to a MACs target with
widths as they fall and rounded to multiples of N, no fine-tune (speed does not depend on the weights' values),
each exported fp32 and int8 (calibrated on training batches) and all timed on ONNX Runtime in one set of
interleaved rounds against the fp32 base.

    python benchmarks/int8_widths.py --base BASE.pt --data DATA [--data-root R] --speedup 2.5 --round-to 4,8 \\
        --batches 1,64 --out benchmarks/results/deploy-int8-X/widths-2.5x.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

import prunekit as pk
from prunekit import tasks
from prunekit.export import export_int8
from prunekit.files import sha256_file
from prunekit.runtimes.ort import session
from prunekit.timing import interleaved, label


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--data-root")
    p.add_argument("--speedup", type=float, required=True)
    p.add_argument("--round-to", default="8", help="comma-separated multiples (the as-they-fall row is always in)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/int8-widths")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    base = pk.load(args.base)
    task = tasks.for_model(base)
    spec = {"name": args.data, "calibration_batches": 4, **({"root": args.data_root} if args.data_root else {})}
    if task.name == "detect":
        from prunekit.yolo import input_size

        spec["image_size"] = input_size(base)
    data = task.load_data(spec, seed=0, split_seed=0, device=torch.device("cpu"))
    calib = [b[0] for b in data.calib][:4]
    models, widths = {"base": base}, {}
    for r in [None, *(int(v) for v in args.round_to.split(","))]:
        m = copy.deepcopy(base)
        pk.prune(m, "l1-norm", calib[0][:2], speedup=args.speedup, **({"round_to": r} if r else {}))
        name = f"l1-norm-{args.speedup:g}x" + (f"-round{r}" if r else "")
        models[name] = m
        widths[name] = sorted({int(q.shape[0]) for q in m.parameters() if q.dim() == 4})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for n, m in models.items():
        export_int8(m, calib, work / f"{n}.onnx")
    one = calib[0][:1].numpy()
    latency = {}
    for b in (int(v) for v in args.batches.split(",")):
        feed = {"input": np.ascontiguousarray(np.broadcast_to(one, (b, *one.shape[1:])))}
        s = {f"{n}/{k}": session(work / f"{n}{suf}", args.threads, spinning=False)
             for n in models for k, suf in (("fp32", ".onnx"), ("int8", ".int8.onnx"))}
        res = interleaved({k: (lambda v=v, f=feed: v.run(None, f)) for k, v in s.items()}, args.rounds, 3)
        latency[f"b{b}"] = {k: {"median_ms": v["median_ms"], "ratio": v["ratio"], "label": label(v["ratio"])}
                            for k, v in res.items()}
        print(f"b{b}", json.dumps({k: v["label"] for k, v in latency[f"b{b}"].items()}, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/int8_widths.py " + " ".join(sys.argv[1:]),
                               "base_sha256": sha256_file(args.base), "threads": args.threads, "rounds": args.rounds,
                               "conv_output_widths": widths, "latency": latency}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
