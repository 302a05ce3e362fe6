"""Command line: ``prunekit demo | train | finetune | prune | eval | export | methods``.

User errors (``PrunekitError``) print one line and exit with code 2; commands refuse to
overwrite existing results unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from . import data as pkdata
from . import distill, io, methods, models, runtimes, tasks
from .errors import PrunekitError
from .graph import run_checked
from .masks import Masks
from .measure import measure
from .tasks import Task
from .train import TrainConfig, dist_info, evaluate, fit, resolve_device


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


def _load_data(args: argparse.Namespace) -> pkdata.DataBundle:
    return pkdata.load(args.data, args.data_root, image_size=args.image_size, cache_dir=args.cache_dir,
                       download=args.download, limit=args.limit, seed=getattr(args, "seed", 0))


def _input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    arch = getattr(model, "prunekit_arch", {})
    shape = arch.get("input_shape") or models.default_input_size(arch["name"])
    return tuple(shape)


def _train_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, schedule=args.schedule,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                       batch_size=args.batch_size or 128, seed=args.seed)


def _guard_out(out: Path, args: argparse.Namespace) -> None:
    """Never overwrite a run: a finished or interrupted one is resumed (--resume) or replaced (--force) only."""
    if args.resume and args.force:
        raise PrunekitError("--resume continues a run and --force replaces it: give one of them")
    if args.resume and (out / "model.pt").exists():
        raise PrunekitError(f"{out} holds a finished run (model.pt), nothing to resume; use --force to train it "
                            "again or another --out")
    if args.resume and not (out / "last.pt").exists():
        raise PrunekitError(f"{out} holds no interrupted run to resume (no last.pt); drop --resume to start one")
    if args.force and not args.resume:
        for name in ("model.pt", "last.pt", "log.jsonl"):
            (out / name).unlink(missing_ok=True)
        return
    if (out / "model.pt").exists() and not args.resume:
        raise PrunekitError(f"{out} already holds a finished run; use --resume, --force or another --out")
    if (out / "last.pt").exists() and not args.resume:
        raise PrunekitError(f"{out} holds an interrupted run; continue it with --resume, or use --force to start "
                            "over or another --out")


def _run_training(model: torch.nn.Module, args: argparse.Namespace, bundle: pkdata.DataBundle,
                  desc: str) -> int:
    if not str(args.out).strip():
        raise PrunekitError("--out is empty: give a folder for the run")
    out = Path(args.out)
    cfg = _train_cfg(args)
    dev = resolve_device(args.device)
    run_checked(model, pkdata.example_inputs(bundle, batch=1), f"checking the model against data {bundle.name}")
    if dist_info()[0] != 0:
        return _train_loop(model, args, bundle, desc, out, cfg, dev)
    with io.run_lock(out):
        _guard_out(out, args)
        return _train_loop(model, args, bundle, desc, out, cfg, dev)


def _train_loop(model: torch.nn.Module, args: argparse.Namespace, bundle: pkdata.DataBundle, desc: str, out: Path,
                cfg: TrainConfig, dev: torch.device) -> int:
    train_loader, test_loader = bundle.loaders(batch_size=cfg.batch_size, device=dev, seed=cfg.seed,
                                               **_dist_kwargs())
    masks = None
    if getattr(args, "keep_zeros", False):  # unstructured pruning: zeros stay zero through the fine-tune
        masks = Masks.from_zeros(model.to(dev))
        masks.attach(model)
    distiller = getattr(args, "distiller", None)
    model, result = fit(model, train_loader, test_loader, cfg, device=dev, run_dir=out, resume=args.resume,
                        desc=desc, after_step=masks.after_step if masks is not None else None,
                        distill=distiller.to(dev) if distiller is not None else None)
    if dist_info()[0] == 0:
        io.save(model, out / "model.pt", data=bundle.name)
        print(json.dumps({"out": str(out / "model.pt"), **result.final}))
    return 0


def _dist_kwargs() -> dict[str, int]:
    rank, world = dist_info()
    return {"rank": rank, "world_size": world}


def cmd_train(args: argparse.Namespace) -> int:
    bundle = _load_data(args)
    torch.manual_seed(args.seed)  # the initial weights are part of the run's reproducible state
    model = models.create(args.model, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    model.prunekit_arch["input_shape"] = list(bundle.input_shape)
    return _run_training(model, args, bundle, "train")


def cmd_finetune(args: argparse.Namespace) -> int:
    model = io.load(args.checkpoint)
    own = tasks.for_model(model).cli_finetune  # a task with a trainer of its own
    if own is not None:
        return own(args, model)
    bundle = _load_data(args)
    classes = (getattr(model, "prunekit_arch", None) or {}).get("num_classes")
    if classes is not None and classes != bundle.num_classes:
        raise PrunekitError(f"{args.checkpoint} predicts {classes} classes but data {bundle.name} has "
                            f"{bundle.num_classes}; fine-tune it on data with the classes it was trained on")
    if args.distill:
        spec = distill.check({"teacher": args.distill, "alpha": args.alpha, "temperature": args.temperature},
                             "--distill")
        args.distiller = distill.Distiller(io.load(spec["teacher"]), spec["alpha"], spec["temperature"])
        args.distiller.check_against(model, pkdata.example_inputs(bundle), "--distill")
    return _run_training(model, args, bundle, "finetune")


def _param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (numbers, true/false, null, lists) — the same types as a config."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"value of {key} is not valid YAML: {exc}") from exc


def _example_inputs(model: torch.nn.Module, bundle: pkdata.DataBundle | None) -> torch.Tensor:
    """Real training images when data is given; otherwise a fixed normal draw (what normalised images look like)."""
    if bundle is not None:
        return pkdata.example_inputs(bundle)
    return torch.randn(8, *_input_shape(model), generator=torch.Generator().manual_seed(0))


def _trained_ultralytics(args: argparse.Namespace) -> torch.nn.Module:
    """``--model ul:best.pt``: the model Ultralytics trained, with its weights and classes."""
    if not (args.model.startswith(models.UL_PREFIX) and args.model.endswith(".pt")):
        raise PrunekitError(f"--model takes ul:path/to/best.pt (a model Ultralytics trained), got {args.model!r}; "
                            "for a prunekit model file use --checkpoint")
    kwargs = {"trust_pickle": args.trust_pickle} | ({"imgsz": args.image_size} if args.image_size else {})
    return models.create(args.model, num_classes=None, **kwargs)


def cmd_prune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PrunekitError(f"{out} already exists; use --force to overwrite or choose another --out")
    method = methods.get(args.method)
    opts: dict[str, Any] = dict(args.param or [])
    flags = {"min_keep": args.min_keep, "round_to": args.round_to, "percentile": args.percentile, "q": args.q,
             "ignored_layers": args.ignore.split(",") if args.ignore else None}  # shorthands of method options
    for key, value in flags.items():
        if value is not None and key not in opts:
            if key not in method.options:
                raise PrunekitError(f"--{key.replace('_', '-')} is not an option of method {args.method!r}; "
                                    f"its options: {', '.join(method.options) or 'none'}")
            opts[key] = value
    method.check_options(opts)  # before anything is loaded
    if args.speedup is not None and args.speedup <= 1.0:
        raise PrunekitError(f"--speedup {args.speedup:g} removes nothing: give a speedup > 1 (base MACs / pruned MACs)")
    timed = {k: v for k, v in (("runtime", args.runtime), ("batch", args.batch), ("threads", args.threads))
             if v is not None}
    if timed and args.latency is None:
        raise PrunekitError("--runtime, --batch and --threads say where a --latency target is timed: add --latency")
    model = io.load(args.checkpoint) if args.checkpoint else _trained_ultralytics(args)
    data = val = bundle = None
    x = None
    own = tasks.for_model(model).cli_calibration  # a task with data of its own
    if args.data and own is not None:
        data, val, x = own(args.data, model, args.seed)
    elif args.data:
        bundle = _load_data(args).holdout(0.1, seed=args.seed)
        data = bundle.eval_loader(bundle.train, 128, shuffle=True, seed=args.seed)
        val = bundle.eval_loader(bundle.val, 256)
    result = methods.prune(model, args.method, x if x is not None else _example_inputs(model, bundle),
                           speedup=args.speedup, sparsity=args.sparsity, latency=args.latency, **timed, data=data,
                           val=val, **opts)
    io.save(result.model, out, prune=result.to_dict())
    print(result.summary())
    print(f"saved {out}")
    return 0


def _evaluate_payload(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, Any]:
    payload: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    bundle = _load_data(args) if args.data else None
    x = _example_inputs(model, bundle)[:1]
    run_checked(model, x, "checking the model against " + (f"data {bundle.name}" if bundle else "its input shape"))
    if bundle is not None:
        payload["top1"] = evaluate(model, bundle.eval_loader(bundle.test), "cpu")["top1"]
    stats = measure(model, x, repeats=args.repeats, threads=args.threads)
    payload.update(stats)
    if args.onnx:
        from .export import onnx_latency

        payload["onnx_latency"] = onnx_latency(model, x, repeats=args.repeats, threads=args.threads)
    if args.base:
        base = io.load(args.base)
        bstats = measure(base, x, repeats=args.repeats, threads=args.threads)
        payload["theoretical_speedup"] = bstats["macs"] / payload["macs"]
        payload["measured_speedup"] = {b: bstats["latency"][b]["median_ms"] / payload["latency"][b]["median_ms"]
                                       for b in payload["latency"]}
        if args.onnx:
            from .export import onnx_latency

            bl = onnx_latency(base, x, repeats=args.repeats, threads=args.threads)
            payload["onnx_measured_speedup"] = {b: bl[b]["median_ms"] / payload["onnx_latency"][b]["median_ms"]
                                                for b in bl}
    return payload


def _eval_task(args: argparse.Namespace, model: torch.nn.Module) -> Task:
    """``--task`` as given, or the task that owns the model; refuse a task the model cannot do."""
    task = tasks.for_model(model)
    if args.task and args.task != task.name:
        name = str((getattr(model, "prunekit_arch", None) or {}).get("name", type(model).__name__))
        raise PrunekitError(f"{args.checkpoint} holds '{name}', a model of task {task.name}: evaluate it with "
                            f"--task {task.name}")
    return task


def cmd_eval(args: argparse.Namespace) -> int:
    model = io.load(args.checkpoint)
    own = _eval_task(args, model).cli_eval  # a task with an evaluation of its own
    if own is not None:
        return own(args, model)
    if args.split != "test" or args.imgsz is not None:
        raise PrunekitError("--split and --imgsz apply to detectors (--task detect) only")
    payload = _evaluate_payload(args, model)
    if args.json:
        print(json.dumps(payload))
        return 0
    if "top1" in payload:
        print(f"top-1        {payload['top1']:.2f} %")
    print(f"params       {payload['params'] / 1e6:.4f} M")
    print(f"MACs         {payload['macs'] / 1e6:.2f} M")
    print(f"size         {payload['size_bytes'] / 1e6:.2f} MB")
    for b, lat in payload["latency"].items():
        print(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, {lat['threads']} threads, torch eager)")
    for b, lat in payload.get("onnx_latency", {}).items():
        print(f"latency {b:<4} {lat['median_ms']:.2f} ms (median, onnxruntime)")
    if "theoretical_speedup" in payload:
        print(f"speedup      theoretical {payload['theoretical_speedup']:.2f}x, measured "
              + ", ".join(f"{b} {v:.2f}x" for b, v in payload["measured_speedup"].items()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PrunekitError(f"{out} already exists; use --force to overwrite or choose another --out")
    if args.gzip and args.format != "sparse":
        raise PrunekitError("--gzip compresses the sparse format only; ONNX files are written as they are")
    if args.int8:
        from .export import int8_path

        if args.format != "onnx":
            raise PrunekitError("--int8 quantises an ONNX export: use --format onnx")
        if not args.data:
            raise PrunekitError("--int8 calibrates activation ranges on training batches: give --data")
        if int8_path(out).exists() and not args.force:
            raise PrunekitError(f"{int8_path(out)} already exists; use --force to overwrite or choose another --out")
        if out.suffix != ".onnx":
            raise PrunekitError(f"--out {out} must end in .onnx with --int8 (the int8 model is written beside it)")
    elif args.data or args.calibration_batches != 16 or args.calibration_method != "minmax":
        raise PrunekitError("--data and --calibration-* set up int8 calibration: add --int8")
    model = io.load(args.checkpoint)
    if args.format == "sparse":
        from .sparse import export_sparse

        info = export_sparse(model, out, values=args.values, compress=args.gzip)
    elif args.int8:
        info = _export_int8(args, model, out)
    else:
        from .export import export_onnx

        with tasks.for_model(model).export_mode(model):  # one output tensor
            info = export_onnx(model, _example_inputs(model, None)[:1], out, opset=args.opset)
    print(json.dumps(info))
    return 0


def _export_int8(args: argparse.Namespace, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """fp32 and int8 ONNX, calibrated on training batches of --data; both measured on its test split."""
    from .export import deploy_table, export_int8, int8_path

    task = tasks.for_model(model)
    spec = {"name": args.data, "root": args.data_root, "image_size": args.image_size, "limit": args.limit,
            "download": args.download, "calibration_batches": args.calibration_batches}
    if task.name == "detect":
        from .yolo import input_size

        spec = {"name": args.data, "image_size": input_size(model), "calibration_batches": args.calibration_batches}
    data = task.load_data({k: v for k, v in spec.items() if v is not None}, seed=0, split_seed=0,
                          device=torch.device("cpu"))
    task.check_model(model, data, str(args.checkpoint))
    calibration = [batch[0] for batch in data.calib][: args.calibration_batches]
    info = export_int8(model, calibration, out, method=args.calibration_method, opset=args.opset)
    table = deploy_table({"model": (model, out)}, data, task, threads=args.threads, batch_sizes=task.latency_batches)
    row = table["model"]
    info["metrics"] = {"pytorch": task.test_metrics(model, data, torch.device("cpu")), "fp32_onnx": row["fp32"],
                       "int8": row["int8"]}
    info["speedup_int8_vs_fp32"] = {str(b): table["latency"][f"b{b}"]["model/int8"]["ratio"]
                                    for b in task.latency_batches}
    print(f"int8: {int8_path(out)} ({row['int8_bytes'] / 1e6:.2f} MB, fp32 {row['fp32_bytes'] / 1e6:.2f} MB); "
          f"{task.metric} on the test split: fp32 {row['fp32'][task.metric]:.2f}, int8 {row['int8'][task.metric]:.2f}",
          file=sys.stderr)
    return info


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    metrics = run(args.config, force=args.force, out=args.out)
    print(json.dumps({"before": metrics["before"], "after": metrics["after"]}))
    print(f"report: {Path(metrics['run_dir']) / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import load_config, run

    board = run(args.config, out=args.out, force=args.force, board_only=args.board_only)
    out = Path(args.out or load_config(args.config)["out"])
    print(f"leaderboard: {out / 'leaderboard.json'}, {out / 'leaderboard.html'}")
    if board["cells"]["failed"]:  # the leaderboard is written, but a script must not take it for complete
        print(f"error: {len(board['cells']['failed'])} of {board['cells']['total']} cells failed (see "
              f"{out / 'errors'})", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    html_path, md_path = write_report(args.runs, args.out)
    print(f"wrote {html_path} and {md_path}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for m in methods.available():
        data = ", needs --data" if m.needs_data else ""
        print(f"{m.name:<14} {m.kind:<12} target: {m.target}{data}\n    {m.summary}")
        for o in m.options.values():
            choices = f" ({' | '.join(map(str, o.choices))})" if o.choices else ""
            print(f"    --param {o.name}=<{o.type_name()}>  default {o.default!r}{choices}: {o.help}")
        for o in m.regularizer_options.values():
            print(f"    sparsify stage: {o.name}=<{o.type_name()}>  default {o.default!r}: {o.help}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out) if args.out else None, device=args.device)


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
