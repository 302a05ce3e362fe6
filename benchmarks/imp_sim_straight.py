"""imp-sim's cost-driven stage 2 against its stage 1 alone, straight after pruning (issue 24, goal 1).

Both start from the same sparsified ResNet-20 — the compare protocol's net-slim cell after its sparsity
epoch (``OUT/cells/net-slim-2.5x-s0/stages/01-sparsify/model.pt`` of ``compare/resnet20-cifar10-cpu.yaml``)
— and prune it with imp-sim: ``stage1_share: 1`` is stage 1 alone (the global BN-|γ| ranking, net-slim's
cut), ``stage1_share: auto`` decides every removal or merge by its calibration cost. Each is a pipeline
run with one prune stage (calibration batches from the training split, the compare's held-out split);
the table's top-1 is the test split's, straight after pruning, with the calibration reconstruction error
of both plans (imp-sim auto's own and stage 1's, on the same batches).

    python benchmarks/imp_sim_straight.py \\
        --sparse runs/compare-resnet20/cells/net-slim-2.5x-s0/stages/01-sparsify/model.pt \\
        --data-root ../shared/data/cifar10/cifar10-jpeg.tar.gz --out benchmarks/results/imp-sim-straight-resnet20.json

The detector half (``--detect``): the BCCD protocol's sparsified yolov8n (``compare/yolov8n-bccd-cpu.yaml``'s
shared sparsify stage of net-slim and imp-sim, 20 epochs at s = 1e-2, seed 0; sha256 ``54a01dc7863c…``; the
results' command names the adaptive-slim cell's copy of it, the same bytes), pruned at 2x; its table is test
mAP50 and mAP50-95 straight after pruning, and the val mAP50-95 the pipeline scores the prune stage by.

    python benchmarks/imp_sim_straight.py --detect --speedups 2 \\
        --sparse runs/compare-bccd-yolov8n/shared/002b12172ace29b3c73aaa28/model.pt \\
        --data-root ../shared/data/bccd --out benchmarks/results/imp-sim-straight-bccd-yolov8n.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from prunekit import io, pipeline

RUNS = {"stage 1 alone": {"stage1_share": 1.0}, "imp-sim auto": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", type=Path, required=True, help="the sparsified model file")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 2.6])
    ap.add_argument("--runs-dir", type=Path, help="default: runs/imp-sim-straight[-detect]")
    ap.add_argument("--detect", action="store_true", help="an Ultralytics detector on a Pascal VOC folder")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = ({"name": args.data_root, "image_size": args.image_size, "batch_size": 16} if args.detect else
            {"name": "cifar10", "root": args.data_root, "batch_size": 128})
    metrics_of = ("mAP50", "mAP50-95") if args.detect else ("top1",)
    runs_dir = args.runs_dir or Path("runs/imp-sim-straight" + ("-detect" if args.detect else ""))
    sha = io.sha256_file(args.sparse)
    rows = []
    for speedup in args.speedups:
        for run, params in RUNS.items():
            cfg = {"name": f"{run} {speedup:g}x", "model": {"checkpoint": str(args.sparse.absolute())},
                   "data": {**data, "split_seed": 0},
                   "method": {"name": "imp-sim", "params": params}, "target": {"speedup": speedup}, "seed": 0,
                   "out": str(runs_dir / f"{run.replace(' ', '-')}-{speedup:g}x"), "stages": [{"stage": "prune"}],
                   **({"task": "detect"} if args.detect else {})}
            t0 = time.perf_counter()
            metrics = pipeline.run(cfg)
            done = io.safe_load(Path(cfg["out"]) / "stages" / "01-prune" / "done.pt")
            info = done["prune"]["info"]
            rows.append({"run": run, "speedup_target": speedup, "stage1_share": info.get("stage1_share"),
                         "macs_ratio": metrics["before"]["macs"] / metrics["after"]["macs"],
                         **{f"sparse_{m}": metrics["before"][m] for m in metrics_of},
                         **{f"{m}_pruned": metrics["after"][m] for m in metrics_of}, "val_pruned": done["metric"],
                         "error": info.get("error"), "stage1_error": info.get("stage1_error"),
                         "groups": info.get("groups"), "sparse_sha256": sha,
                         "wall_s": round(time.perf_counter() - t0, 1),
                         "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)})
            m = metrics_of[0]
            print(f"{run:>14} {speedup:g}x: {rows[-1]['macs_ratio']:.2f}x MACs, {m} {rows[-1][f'{m}_pruned']:.2f} "
                  f"(sparsified {rows[-1][f'sparse_{m}']:.2f}), error {rows[-1]['error']}", flush=True)
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
