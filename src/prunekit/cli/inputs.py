"""What the commands feed a model: the data a ``--data`` names, and example inputs without it."""

from __future__ import annotations

import argparse

import torch

from .. import data as pkdata
from .. import models


def _load_data(args: argparse.Namespace) -> pkdata.DataBundle:
    return pkdata.load(args.data, args.data_root, image_size=args.image_size, cache_dir=args.cache_dir,
                       download=args.download, limit=args.limit, seed=getattr(args, "seed", 0))


def _input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    arch = getattr(model, "prunekit_arch", {})
    shape = arch.get("input_shape") or models.default_input_size(arch["name"])
    return tuple(shape)


def _example_inputs(model: torch.nn.Module, bundle: pkdata.DataBundle | None) -> torch.Tensor:
    """Real training images when data is given; otherwise a fixed normal draw (what normalised images look like)."""
    if bundle is not None:
        return pkdata.example_inputs(bundle)
    return torch.randn(8, *_input_shape(model), generator=torch.Generator().manual_seed(0))
