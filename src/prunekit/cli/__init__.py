"""Command line: ``prunekit demo | train | finetune | prune | eval | export | methods``.

User errors (``PrunekitError``) print one line and exit with code 2; commands refuse to
overwrite existing results unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import yaml

from .. import distill, runtimes, tasks
from ..errors import PrunekitError
from .evaluate import cmd_eval
from .export import cmd_export
from .prune import cmd_methods, cmd_prune
from .runs import cmd_compare, cmd_demo, cmd_report, cmd_run
from .train import cmd_finetune, cmd_train

__all__ = ["build_parser", "main"]


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, help="digits | cifar10 | synthetic | an ImageFolder directory "
                   "(detectors: a Pascal VOC directory or a YOLO data yaml)")
    p.add_argument("--data-root", help="local path for the data set (cifar10: folder or .tar.gz)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if no local copy")
    p.add_argument("--image-size", type=_positive, help="resize folder images to this square size")
    p.add_argument("--limit", type=_positive, help="use only this many training images (quick runs)")
    p.add_argument("--cache-dir", help="where decoded images are cached (default ~/.cache/prunekit)")


def _add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=_count, default=epochs)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine", "constant"])
    p.add_argument("--weight-decay", type=_non_negative, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--batch-size", type=_positive, help="images per batch (default 128; detectors 16)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True, help="run directory (checkpoint, log.jsonl, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a finished run directory")


def _param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (numbers, true/false, null, lists) — the same types as a config."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"value of {key} is not valid YAML: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train, prune, fine-tune and compare on the bundled digits data (~1 min)")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train a zoo or torchvision model")
    p.add_argument("--model", required=True, help="zoo name (see prunekit.models.names()) or tv:<name>")
    _add_data_args(p, required=True)
    _add_train_args(p, epochs=12, lr=0.2)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) model file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--keep-zeros", action="store_true", help="keep zero weights at zero (after magnitude pruning)")
    p.add_argument("--distill", metavar="TEACHER.pt",
                   help="distil from this model file (e.g. the unpruned base): alpha*T^2*KL + (1-alpha)*CE")
    p.add_argument("--alpha", type=float, default=distill.DEFAULTS["alpha"], help="with --distill: weight of the KL")
    p.add_argument("--temperature", type=float, default=distill.DEFAULTS["temperature"],
                   help="with --distill: softmax temperature T")
    _add_data_args(p, required=True)
    _add_train_args(p, epochs=6, lr=0.05)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("prune", help="prune a model file with a registered method")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a prunekit model file (pk.save, prunekit train/prune/finetune)")
    source.add_argument("--model", help="ul:path/to/best.pt: a model Ultralytics trained (with --trust-pickle; "
                        "--image-size sets its input size, default 640)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="--model's .pt is a pickle (loading it runs code): say you trust the file")
    p.add_argument("--method", required=True, help="see `prunekit methods`")
    p.add_argument("--param", action="append", type=_param, metavar="KEY=VALUE",
                   help="a method option (repeatable; `prunekit methods` lists them), e.g. --param ranking=global")
    _add_data_args(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the validation split held out of --data")
    p.add_argument("--speedup", type=float, help="target MACs ratio base/pruned (structured methods)")
    p.add_argument("--sparsity", type=float, help="fraction of weights to zero (unstructured methods)")
    p.add_argument("--latency", type=float, help="target *measured* speedup on --runtime at --batch with --threads "
                   "on this machine, within 5 %% (structured methods; instead of --speedup)")
    p.add_argument("--runtime", help=f"where --latency is timed: {', '.join(runtimes.names())} (default eager)")
    p.add_argument("--batch", type=_positive, help="batch size --latency is timed at (default 64)")
    p.add_argument("--threads", type=_positive, help="threads --latency is timed with (default 2)")
    p.add_argument("--percentile", type=float, help="the method's option percentile (net-slim: global |γ| "
                   "percentile instead of --speedup)")
    p.add_argument("--q", type=float, help="the method's option q (magnitude: per-layer threshold q·σ(W), "
                   "instead of --sparsity)")
    p.add_argument("--ignore", help="comma-separated module names never pruned (structured methods never prune "
                   "the classifier's outputs)")
    p.add_argument("--min-keep", type=_positive)
    p.add_argument("--round-to", type=_positive)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("eval", help="accuracy (or mAP), params, MACs, size and latency of a model file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", choices=tasks.names(),
                   help="default: detect for an ul: (Ultralytics) model, classify otherwise")
    _add_data_args(p)
    p.add_argument("--split", default="test", help="detect: the split mAP is measured on (default test)")
    p.add_argument("--imgsz", type=_positive, help="detect: square image size (default: the model's input size)")
    p.add_argument("--batch-size", type=_positive, default=16, help="detect: validation batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--onnx", action="store_true", help="also time ONNX Runtime")
    p.add_argument("--base", help="unpruned model file: report theoretical and measured speedup")
    p.add_argument("--repeats", type=_positive, default=30)
    p.add_argument("--threads", type=_positive, help="fix the number of CPU threads (default: torch's)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="export a model file: ONNX, or compressed sparse storage (CSR)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "sparse"])
    p.add_argument("--opset", type=int, default=17, choices=range(17, 21), metavar="{17..20}",
                   help="onnx: opset (17 to 20)")
    p.add_argument("--values", default="fp32", choices=["fp32", "fp16"], help="sparse: value precision")
    p.add_argument("--gzip", action="store_true", help="sparse: gzip the file")
    p.add_argument("--int8", action="store_true", help="onnx: also write OUT's int8 model (OUT with .int8.onnx), "
                   "static quantisation calibrated on training batches of --data, both measured on its test split")
    _add_data_args(p)
    p.add_argument("--calibration-batches", type=_positive, default=16,
                   help="int8: training batches the activation ranges are calibrated on (default 16)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"],
                   help="int8: how activation ranges are chosen (default minmax)")
    p.add_argument("--threads", type=_positive, default=2, help="int8: threads the models are timed with")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("run", help="run (or resume) a staged pipeline from a YAML config")
    p.add_argument("config")
    p.add_argument("--out", help="run directory (overrides the config's out)")
    p.add_argument("--force", action="store_true", help="restart a run directory that holds another config")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compare", help="methods x targets x seeds from one base with one budget: a leaderboard")
    p.add_argument("config")
    p.add_argument("--out", help="compare folder (overrides the config's out)")
    p.add_argument("--force", action="store_true",
                   help="reuse a folder that holds another compare config (cells whose config changed re-run)")
    p.add_argument("--board-only", action="store_true",
                   help="write the leaderboard of the cells finished so far; run nothing (a partial compare)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("report", help="HTML + Markdown report of one or more finished runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="directory for a multi-run report (default: <parent>/report-compare)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("methods", help="list pruning methods")
    p.set_defaults(fn=cmd_methods)
    return parser


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse turns the error into a usage line, exit 2)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


_positive, _count = _at_least(1), _at_least(0)


def _seed(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2^32) (what numpy and scikit-learn accept)."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^32), got {text}")
    return value


def _non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not a bug: a read-only folder, a full disk, a name too long
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"prunekit: error: {exc.strerror or exc}{where}; check the path, free space and permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted; re-run with --resume to continue", file=sys.stderr)
        return 130
    finally:  # under torchrun: a gloo group left alive at exit can abort the process ("terminate called ...")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
