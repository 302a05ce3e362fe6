"""Prunability sweep: every torchvision classification model, pruned by l1-norm, dist-fit and adaptive-slim
to 1.5x fewer MACs, then forward, then a save/load round trip in a fresh process that must give the same
outputs. A refusal must be a PrunekitError that leaves the model as it was (checked).

Each model runs in its own subprocess (a crash or out-of-memory in one cannot stop the sweep), each reload
in another, and one JSON line per model and method is appended to --out as the model finishes;
re-running skips finished models. ``--jobs`` runs several models at once (on a many-core machine).

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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torchvision

METHODS = ("l1-norm", "dist-fit", "adaptive-slim")
CHILD = r"""
import copy, json, sys, time, torch, prunekit as pk
name, size, tmp, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
torch.manual_seed(0)
base = pk.models.create("tv:" + name, num_classes=10).eval()
for bn in (m for m in base.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
    # BN scales as sparsity training leaves them (half the channels near zero), so adaptive-slim's learned
    # threshold has something to find; the norm-based methods rank the conv weights and do not see them.
    low = torch.rand(bn.num_features) < 0.5
    bn.weight.data = torch.where(low, 1e-3, 1.0) * (0.5 + 0.5 * torch.rand(bn.num_features))
if name.startswith(("vit", "swin", "maxvit")):  # transformers at their native size (at 64 px Swin's
    size = 224                                  # attention products, which stay, cap l1-norm at 1.42x)
x = torch.randn(1, 3, size, size)
try:
    base(x)
except Exception:
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, size, size)
x2 = torch.randn(2, 3, size, size)
for method in methods:
    t0 = time.perf_counter()
    m = copy.deepcopy(base)
    row = {"model": name, "method": method, "input": size}
    try:
        r = pk.prune(m, method, x, speedup=1.5)
        with torch.no_grad():
            y = r.model(x2)
        assert y.shape == (2, 10), y.shape
        pk.save(r.model, f"{tmp}/{method}.pt")
        torch.save({"x": x2, "y": y}, f"{tmp}/{method}.io.pt")
        row |= {"ok": True, "speedup": r.speedup, "params": [r.before["params"], r.after["params"]]}
    except pk.PrunekitError as exc:  # a refusal: clean, named, the model as it was
        same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), base.state_dict().values()))
        row |= {"ok": False, "refused": True, "untouched": same, "reason": str(exc)[:300]}
    row["s"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
"""
RELOAD = r"""
import sys, torch, prunekit as pk
m, d = pk.load(sys.argv[1] + ".pt"), torch.load(sys.argv[1] + ".io.pt", weights_only=True)
with torch.no_grad():
    diff = (m(d["x"]) - d["y"]).abs().max().item()
print(diff)
sys.exit(0 if diff <= 1e-5 * (1 + d["y"].abs().max().item()) else 1)
"""


def summary(path: Path) -> str:
    """Markdown: per method, how many models pruned, ran and reloaded; which were refused (and why) or failed."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    names = torchvision.models.list_models(module=torchvision.models)
    lines = []
    for method in METHODS:
        got = {r["model"]: r for r in rows if r["method"] == method}
        ok = [n for n in names if got.get(n, {}).get("ok")]
        bad = [got[n] for n in names if n in got and not got[n]["ok"]]
        missing = [n for n in names if n not in got]
        cap = "at most " if method == "adaptive-slim" else ""  # a learned cut, capped by the target
        lines.append(f"**{method}**: {len(ok)} of {len(names)} pruned to {cap}1.5x fewer MACs (speedups "
                     f"{min((got[n]['speedup'] for n in ok), default=0):.3f}-"
                     f"{max((got[n]['speedup'] for n in ok), default=0):.3f}), ran and reloaded in a fresh process "
                     f"with the same outputs; {len(bad)} not pruned, {len(missing)} not run.")
        lines += [f"- `{r['model']}`: {'refused' if r.get('refused') else 'failed'}: {r['reason']}" for r in bad]
        if missing:
            lines.append("- not run: " + ", ".join(f"`{n}`" for n in missing))
    return "\n".join(lines)


def sweep(name: str, args: argparse.Namespace) -> list[dict]:
    """One model, every method: prune in one subprocess, reload each result in another."""
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tv-sweep-")
    rows: list[dict] = []
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, name, str(args.size), tmp, args.methods],
                           capture_output=True, text=True, timeout=args.timeout)
        rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        for row in rows:
            if not row["ok"]:
                continue
            back = subprocess.run([sys.executable, "-c", RELOAD, f"{tmp}/{row['method']}"], capture_output=True,
                                  text=True, timeout=args.timeout)
            row["roundtrip_max_diff"] = back.stdout.strip() or back.stderr.strip().splitlines()[-1][:300]
            row["ok"] = back.returncode == 0
            if not row["ok"]:
                row["reason"] = f"save/load round trip differs or fails: {row['roundtrip_max_diff']}"
        if r.returncode != 0:
            err = [x for x in r.stderr.strip().splitlines() if x.strip()] or ["(no message)"]
            rows += [{"model": name, "method": m, "ok": False, "reason": err[-1][:300],
                      "s": time.perf_counter() - t0} for m in args.methods.split(",")[len(rows):]]
    except subprocess.TimeoutExpired:  # pruning or a reload ran out of time: nothing unchecked counts as ok
        reason = f"timeout after {args.timeout}s"
        for row in rows:
            if row["ok"] and "roundtrip_max_diff" not in row:
                row |= {"ok": False, "reason": f"{reason} (reload)"}
        done = {r["method"] for r in rows}
        rows += [{"model": name, "method": m, "ok": False, "reason": reason, "s": time.perf_counter() - t0}
                 for m in args.methods.split(",") if m not in done]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/tv_sweep.jsonl")
    p.add_argument("--size", type=int, default=64, help="input size tried first (falls back to 224)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--only", help="comma-separated subset")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=1, help="models pruned at once (each in its own processes)")
    p.add_argument("--summary", action="store_true", help="only print the Markdown summary of --out")
    args = p.parse_args()
    if args.summary:
        print(summary(Path(args.out)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(x)["model"] for x in out.read_text().splitlines()} if out.exists() else set()
    names = args.only.split(",") if args.only else torchvision.models.list_models(module=torchvision.models)
    todo = [n for n in names if n not in done]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: each model runs in its own processes
        for job in as_completed([pool.submit(sweep, n, args) for n in todo]):
            rows = job.result()
            with open(out, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            for r in rows:
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
