"""Prunability sweep: every torchvision classification model, l1-norm at 1.5x fewer MACs, then forward,
then a save/load round trip in a fresh process that must give the same outputs.

Each model runs in its own subprocess (a crash or out-of-memory in one cannot stop the sweep), the
reload in a second one, and one JSON line per model is appended to --out as it finishes; re-running
skips finished models.

    python benchmarks/tv_sweep.py --out benchmarks/results/tv_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torchvision

CHILD = r"""
import json, sys, time, torch, prunekit as pk
name, size, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
x2 = torch.randn(2, 3, size, size)
with torch.no_grad():
    y = r.model(x2)
assert y.shape == (2, 10)
pk.save(r.model, tmp + "/m.pt")
torch.save({"x": x2, "y": y}, tmp + "/io.pt")
print(json.dumps({"model": name, "ok": True, "input": size, "speedup": r.speedup,
                  "params": [r.before["params"], r.after["params"]], "s": time.perf_counter() - t0}))
"""
RELOAD = r"""
import sys, torch, prunekit as pk
m, d = pk.load(sys.argv[1] + "/m.pt"), torch.load(sys.argv[1] + "/io.pt", weights_only=True)
with torch.no_grad():
    diff = (m(d["x"]) - d["y"]).abs().max().item()
print(diff)
sys.exit(0 if diff <= 1e-5 * (1 + d["y"].abs().max().item()) else 1)
"""


def summary(path: Path) -> str:
    """Markdown: how many models pruned and ran, which did not (with the reason), which were not run."""
    rows = {r["model"]: r for r in map(json.loads, path.read_text().splitlines())}
    names = torchvision.models.list_models(module=torchvision.models)
    ok = [n for n in names if rows.get(n, {}).get("ok")]
    failed = [rows[n] for n in names if n in rows and not rows[n]["ok"]]
    missing = [n for n in names if n not in rows]
    lines = [f"{len(ok)} of {len(names)} torchvision classification models pruned with l1-norm to 1.5x fewer MACs, "
             f"ran forward and reloaded in a fresh process with the same outputs ({len(failed)} failed, "
             f"{len(missing)} not run)."]
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
        tmp = tempfile.mkdtemp(prefix="tv-sweep-")
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, name, str(args.size), tmp], capture_output=True,
                               text=True, timeout=args.timeout)
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode == 0 and lines:
                row = json.loads(lines[-1])
                back = subprocess.run([sys.executable, "-c", RELOAD, tmp], capture_output=True, text=True,
                                      timeout=args.timeout)
                row["roundtrip"] = back.returncode == 0
                row["roundtrip_max_diff"] = back.stdout.strip() or back.stderr.strip().splitlines()[-1][:300]
                row["ok"] = row["roundtrip"]
                if not row["ok"]:
                    row["reason"] = f"save/load round trip differs or fails: {row['roundtrip_max_diff']}"
            else:
                err = [x for x in r.stderr.strip().splitlines() if x.strip()] or ["(no message)"]
                row = {"model": name, "ok": False, "reason": err[-1][:300], "s": time.perf_counter() - t0}
        except subprocess.TimeoutExpired:
            row = {"model": name, "ok": False, "reason": f"timeout after {args.timeout}s",
                   "s": time.perf_counter() - t0}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
