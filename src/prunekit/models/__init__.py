"""Model zoo: the CIFAR-sized networks pruning papers report on, plus any torchvision classifier.

``create("resnet56")`` builds a zoo model; ``create("tv:resnet18")`` builds
``torchvision.models.get_model("resnet18", weights=None, ...)``; ``create("ul:yolov8n")`` an Ultralytics
detector (``prunekit.yolo``, optional extra ``prunekit[yolo]``). Nothing is ever downloaded: pretrained
torchvision weights come from a local state-dict file via ``weights_path``. Every model is built from
plain modules with static control flow so Torch-Pruning can trace and prune it.
"""

import difflib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.cifar_resnet import BasicBlock, CifarResNet, PadShortcut
from prunekit.models.googlenet import CifarGoogLeNet
from prunekit.models.mobilenet_v2 import CifarMobileNetV2
from prunekit.models.small import DigitsCNN
from prunekit.models.vgg import CifarVGG

__all__ = [
    "BasicBlock",
    "CifarGoogLeNet",
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarVGG",
    "DigitsCNN",
    "PadShortcut",
    "create",
    "default_input_size",
    "is_detector",
    "is_zoo",
    "names",
]

TV_PREFIX = "tv:"
UL_PREFIX = "ul:"


@dataclass(frozen=True)
class _ZooEntry:
    build: Callable[..., nn.Module]
    kwargs: tuple[str, ...]
    input_size: tuple[int, int, int]


_CIFAR = (3, 32, 32)
_ZOO: dict[str, _ZooEntry] = {
    **{f"resnet{d}": _ZooEntry(partial(CifarResNet, d), ("in_channels",), _CIFAR) for d in (20, 32, 56, 110)},
    "vgg16_bn": _ZooEntry(partial(CifarVGG, 16), ("in_channels", "width_mult"), _CIFAR),
    "vgg19_bn": _ZooEntry(partial(CifarVGG, 19), ("in_channels", "width_mult"), _CIFAR),
    "googlenet": _ZooEntry(CifarGoogLeNet, ("in_channels", "width_mult", "stem_stride"), _CIFAR),
    "mobilenet_v2": _ZooEntry(CifarMobileNetV2, ("in_channels", "width_mult"), _CIFAR),
    "digits_cnn": _ZooEntry(DigitsCNN, ("in_channels",), (1, 8, 8)),
}

# torchvision models that otherwise add auxiliary heads (tuple outputs in train mode) and warn about
# their default init.
_TV_EXTRA: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_TV_KWARGS = ("in_channels", "weights_path")


def names() -> list[str]:
    """Sorted zoo model names (``tv:<name>`` models are open-ended and not listed)."""
    return sorted(_ZOO)


def is_zoo(name: str) -> bool:
    """True for a zoo model name, False for ``tv:`` names and unknown names."""
    return name in _ZOO


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` was built as an Ultralytics detector (``ul:<name>``), by its ``prunekit.save`` recipe."""
    return str((getattr(model, "prunekit_arch", None) or {}).get("name", "")).startswith(UL_PREFIX)


def default_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the model was designed for, so callers can build example inputs for tracing/benchmarks."""
    if name in _ZOO:
        return _ZOO[name].input_size
    if name.startswith(UL_PREFIX):
        from prunekit import yolo

        return (3, yolo.DEFAULT_IMGSZ, yolo.DEFAULT_IMGSZ)
    tv_name = _tv_name(name)
    return (3, 299, 299) if tv_name == "inception_v3" else (3, 224, 224)


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model by zoo name or ``tv:<torchvision name>``.

    Zoo kwargs: ``in_channels`` (all), ``width_mult`` (vgg*, googlenet, mobilenet_v2), ``stem_stride``
    (googlenet, 1 or 2). ``tv:`` kwargs: ``weights_path`` (local state dict) and ``in_channels`` (must be 3).
    Every user mistake raises ``PrunekitError`` with a one-line explanation. The returned model
    carries ``prunekit_arch`` (name, num_classes, kwargs): the recipe ``prunekit.save`` records.
    ``ul:`` names are built by ``prunekit.yolo.create`` (kwargs ``imgsz``, ``weights_path``, ``trust_pickle``).
    """
    if name.startswith(UL_PREFIX):
        from prunekit import yolo  # Ultralytics is an optional extra: imported only for ul: names

        return yolo.create(name, num_classes, **kwargs)
    model = _build(name, num_classes, **kwargs)
    recipe = {k: v for k, v in kwargs.items() if k != "weights_path"}
    model.prunekit_arch = {"name": name, "num_classes": num_classes, "kwargs": recipe, "input_shape": []}
    return model


def _build(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    if num_classes < 1:
        raise PrunekitError(f"num_classes must be >= 1, got {num_classes}")
    if name in _ZOO:
        entry = _ZOO[name]
        _check_kwargs(name, kwargs, entry.kwargs)
        return entry.build(num_classes=num_classes, **kwargs)
    tv_name = _tv_name(name)
    _check_kwargs(name, kwargs, _TV_KWARGS)
    if kwargs.get("in_channels", 3) != 3:
        raise PrunekitError(
            f"torchvision models take 3-channel input; '{name}' cannot use in_channels="
            f"{kwargs['in_channels']} (pick a zoo model for other inputs)"
        )
    model = torchvision.models.get_model(
        tv_name, weights=None, num_classes=num_classes, **_TV_EXTRA.get(tv_name, {})
    )
    if kwargs.get("weights_path") is not None:
        _load_state_dict(model, Path(kwargs["weights_path"]), num_classes)
    return model


def _tv_name(name: str) -> str:
    """Strip ``tv:`` and check the torchvision classification model exists; anything else is unknown."""
    if not name.startswith(TV_PREFIX):
        hint = _did_you_mean(name, names())
        raise PrunekitError(
            f"unknown model '{name}':{hint} choose one of {', '.join(names())} "
            f"or tv:<torchvision name> (see prunekit.models.names())"
        )
    tv_name = name.removeprefix(TV_PREFIX)
    available = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in available:
        hint = _did_you_mean(tv_name, available, prefix=TV_PREFIX)
        raise PrunekitError(
            f"unknown torchvision model '{name}':{hint} choose a classification model from "
            f"torchvision.models.list_models(module=torchvision.models), e.g. tv:resnet18"
        )
    return tv_name


def _did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" did you mean '{prefix}{close[0]}'?" if close else ""


def _check_kwargs(name: str, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise PrunekitError(
            f"model '{name}' does not take {', '.join(unknown)}; allowed kwargs: {', '.join(allowed)}"
        )
    if kwargs.get("in_channels", 1) < 1:
        raise PrunekitError(f"in_channels must be >= 1, got {kwargs['in_channels']}")
    if kwargs.get("width_mult", 1.0) <= 0:
        raise PrunekitError(f"width_mult must be > 0, got {kwargs['width_mult']}")
    if kwargs.get("stem_stride", 1) not in (1, 2):
        raise PrunekitError(f"stem_stride must be 1 or 2, got {kwargs['stem_stride']}")


def _load_state_dict(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load local weights, turning a classifier/num_classes mismatch into an actionable error."""
    if not path.is_file():
        raise PrunekitError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise PrunekitError(
            f"cannot read weights from {path}: not a state dict that torch.load(weights_only=True) accepts "
            f"({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict):
        raise PrunekitError(f"{path} does not hold a state dict (got {type(state).__name__})")
    expected = model.state_dict()
    for key, value in state.items():
        want = expected.get(key)
        if want is None or not isinstance(value, torch.Tensor) or value.shape == want.shape:
            continue
        if value.ndim >= 1 and want.ndim >= 1 and want.shape[0] == num_classes:
            raise PrunekitError(
                f"classifier '{key}' in {path} has {value.shape[0]} outputs but "
                f"num_classes={num_classes}; pass num_classes={value.shape[0]}"
            )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise PrunekitError(f"weights in {path} do not fit this model: {detail}") from exc
