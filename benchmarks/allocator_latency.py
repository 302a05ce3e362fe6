"""Does a model's measured CPU latency depend on what the process did before? (glibc's allocator, issue 20)

Times one model at one batch size in eager PyTorch (median of ``--repeats`` after a warm-up, threads fixed),
first in this fresh process, then again after three training steps in the same process; with ``--steady``
prunekit's ``measure.steady_allocator()`` runs first. One JSON object per invocation goes to ``--out``
(appended). Run it once without and once with ``--steady``:

    python benchmarks/allocator_latency.py --model runs/compare-resnet20/base/stages/01-train/model.pt \\
        --out benchmarks/results/allocator-latency-resnet20.jsonl
    python benchmarks/allocator_latency.py --model runs/compare-resnet20/base/stages/01-train/model.pt \\
        --out benchmarks/results/allocator-latency-resnet20.jsonl --steady
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time

import torch

import prunekit as pk
from prunekit.measure import steady_allocator


@torch.no_grad()
def median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """``measure.latency``'s loop without its ``steady_allocator()`` call, which would fix the default arm too."""
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steady", action="store_true", help="call measure.steady_allocator() first")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steady = steady_allocator() if args.steady else False
    model = pk.load(args.model).eval()
    x = torch.zeros(args.batch, *model.prunekit_arch["input_shape"])
    fresh = median_ms(model, x, args.repeats)
    student = copy.deepcopy(model).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    for _ in range(3):  # what a pipeline does before it times: train
        student(torch.randn(2 * args.batch, *x.shape[1:])).sum().backward()
        opt.step()
        opt.zero_grad()
    after = median_ms(model, x, args.repeats)
    row = {"model": args.model, "batch": args.batch, "threads": args.threads, "steady_allocator": steady,
           "fresh_ms": fresh, "after_training_ms": after,
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
