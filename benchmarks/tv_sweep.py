"""Prunability sweep: every torchvision classification model, l1-norm at 1.5x fewer MACs, then forward.

Each model runs in its own subprocess (a crash or out-of-memory in one cannot stop the sweep) and
one JSON line per model is appended to --out as it finishes; re-running skips finished models.

    python benchmarks/tv_sweep.py --out benchmarks/results/tv_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torchvision

CHILD = r"""
import json, sys, time, torch, prunekit as pk
name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
t0 = time.perf_counter()
m = pk.models.create("tv:" + name, num_classes=10).eval()
x = torch.randn(1, 3, size, size)
try:
    m(x)
except Exception:
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
r = pk.prune(m, "l1-norm", x, speedup=1.5)
with torch.no_grad():
    y = r.model(torch.randn(2, 3, size, size))
assert y.shape == (2, 10)
print(json.dumps({"model": name, "ok": True, "input": size, "speedup": r.speedup,
                  "params": [r.before["params"], r.after["params"]], "s": time.perf_counter() - t0}))
"""


def summary(path: Path) -> str:
    """Markdown: how many models pruned and ran, which did not (with the reason), which were not run."""
    rows = {r["model"]: r for r in map(json.loads, path.read_text().splitlines())}
    names = torchvision.models.list_models(module=torchvision.models)
    ok = [n for n in names if rows.get(n, {}).get("ok")]
    failed = [rows[n] for n in names if n in rows and not rows[n]["ok"]]
    missing = [n for n in names if n not in rows]
    lines = [f"{len(ok)} of {len(names)} torchvision classification models pruned with l1-norm to 1.5x fewer MACs "
             f"and ran forward ({len(failed)} failed, {len(missing)} not run)."]
    lines += [f"- fails: `{r['model']}`: {r['reason']}" for r in failed]
    if missing:
        lines.append("- not run yet: " + ", ".join(f"`{n}`" for n in missing))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/tv_sweep.jsonl")
    p.add_argument("--size", type=int, default=64, help="input size tried first (falls back to 224)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--only", help="comma-separated subset")
    p.add_argument("--summary", action="store_true", help="only print the Markdown summary of --out")
    args = p.parse_args()
    if args.summary:
        print(summary(Path(args.out)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(x)["model"] for x in out.read_text().splitlines()} if out.exists() else set()
    names = args.only.split(",") if args.only else torchvision.models.list_models(module=torchvision.models)
    for name in names:
        if name in done:
            continue
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, name, str(args.size)], capture_output=True, text=True,
                               timeout=args.timeout)
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                err = [x for x in r.stderr.strip().splitlines() if x.strip()] or ["(no message)"]
                row = {"model": name, "ok": False, "reason": err[-1][:300], "s": time.perf_counter() - t0}
        except subprocess.TimeoutExpired:
            row = {"model": name, "ok": False, "reason": f"timeout after {args.timeout}s",
                   "s": time.perf_counter() - t0}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
