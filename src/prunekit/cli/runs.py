"""The commands that drive whole runs: ``run`` (a staged pipeline), ``compare`` (a leaderboard), ``report`` and
``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import run

    metrics = run(args.config, force=args.force, out=args.out)
    print(json.dumps({"before": metrics["before"], "after": metrics["after"]}))
    print(f"report: {Path(metrics['run_dir']) / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .. import io
    from ..compare import run

    board = run(args.config, out=args.out, force=args.force, board_only=args.board_only)
    out = Path(args.out or io.read_yaml(args.config)["out"])  # checked by the run: not validated again
    print(f"leaderboard: {out / 'leaderboard.json'}, {out / 'leaderboard.html'}")
    if board["cells"]["failed"]:  # the leaderboard is written, but a script must not take it for complete
        print(f"error: {len(board['cells']['failed'])} of {board['cells']['total']} cells failed (see "
              f"{out / 'errors'})", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    html_path, md_path = write_report(args.runs, args.out)
    print(f"wrote {html_path} and {md_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.out) if args.out else None, device=args.device)
