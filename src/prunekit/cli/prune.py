"""``prunekit prune`` (a model file with a registered method) and ``prunekit methods`` (what it can use)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .. import io, methods, models, tasks
from ..errors import PrunekitError
from .inputs import _example_inputs, _load_data


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


def cmd_methods(args: argparse.Namespace) -> int:
    for m in methods.available():
        data = ", needs --data" if m.needs_data else ""
        print(f"{m.name:<14} {m.kind.name:<12} target: {m.target}{data}\n    {m.summary}")
        for o in m.options.values():
            choices = f" ({' | '.join(map(str, o.choices))})" if o.choices else ""
            print(f"    --param {o.name}=<{o.type_name()}>  default {o.default!r}{choices}: {o.help}")
        for o in m.regularizer_options.values():
            print(f"    sparsify stage: {o.name}=<{o.type_name()}>  default {o.default!r}: {o.help}")
    return 0
