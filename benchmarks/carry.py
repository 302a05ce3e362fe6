"""Carry a compare's work from one session to the next through the repository.

The machines these benchmarks run on start fresh every session, and a protocol needs more CPU hours than one
session has. ``save`` copies what ``prunekit compare`` needs to resume into a folder that is committed:
every run's config, split, log, metrics and stage markers, and the models a resume reads (a finished run:
only its final model, which the leaderboard times; an unfinished one: every finished stage's model, which
its next stage starts from), and the sparsity stages cells share (``OUT/shared``). ``load`` puts them back,
so the compare re-runs nothing that finished. Mid-stage training checkpoints and reports are not carried (a
stage restarts).

    python benchmarks/carry.py save runs/compare-resnet20 benchmarks/results/compare-resnet20-cpu/state
    python benchmarks/carry.py load benchmarks/results/compare-resnet20-cpu/state runs/compare-resnet20

Run directories record absolute paths: load into the same path the compare ran in (the repository's
``runs/`` of a checkout at the same place), or the cells are re-run.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SMALL = {".yaml", ".json", ".jsonl"}
SKIP = {"report.md", "report.html"}


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml") if (p.parent / "stages").is_dir())


def _carried(run: Path) -> list[Path]:
    """The files of one pipeline run that a resume (or the leaderboard) reads."""
    done = sorted(run.glob("stages/*/done.pt"))
    finished = (run / "metrics.json").exists()
    models = [done[-1].parent / "model.pt"] if finished and done else [d.parent / "model.pt" for d in done]
    small = [p for p in run.iterdir() if p.is_file() and p.suffix in SMALL and p.name not in SKIP]
    return small + done + [m for m in models if m.exists()]


def save(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    files = [p for p in src.iterdir() if p.is_file() and p.suffix in SMALL]  # compare.yaml, latency.json, boards
    files += list((src / "errors").glob("*.json"))
    files += [p for p in (src / "shared").glob("*/*") if not p.parent.name.startswith(".")]  # shared sparsify stages
    runs = _run_dirs(src)
    for run in runs:
        files += _carried(run)
    for f in files:
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
    size = sum(f.stat().st_size for f in files)
    print(f"saved {len(files)} files ({size / 1e6:.1f} MB) of {len(runs)} runs to {dst}")


def load(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    print(f"loaded {src} into {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "load"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    (save if args.action == "save" else load)(args.src, args.dst)


if __name__ == "__main__":
    main()
