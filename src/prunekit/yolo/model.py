"""Ultralytics detectors as prunekit models: ``ul:`` names resolved to the yamls Ultralytics ships, the
``DetectionModel`` built (or loaded from a trained ``.pt``), rewritten so Torch-Pruning can trace it, and the
layers pruning must leave alone."""

from __future__ import annotations

import copy
import difflib
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunekitError
from .offline import ultralytics

PREFIX = "ul:"
DEFAULT_IMGSZ = 640
_KWARGS = ("imgsz", "weights_path", "trust_pickle")


# ---- names ----
def _yaml_files() -> dict[str, Path]:
    ul = ultralytics()
    root = Path(ul.__file__).parent / "cfg" / "models"
    return {p.stem: p for p in sorted(root.rglob("*.yaml"))}


def resolve(name: str) -> tuple[Path, str]:
    """(yaml file, scale letter) of ``ul:<name>``: yolov8n -> (yolov8.yaml, n), yolov3-tinyu -> (yolov3-tiny.yaml, '').

    The trailing ``u`` of Ultralytics' release names (yolov5nu, yolov3u: anchor-free heads) is optional,
    since every yaml Ultralytics ships builds that head.
    """
    stem = name.removeprefix(PREFIX).removesuffix(".yaml")
    files = _yaml_files()
    for cand in dict.fromkeys((stem, stem[:-1] if stem.endswith("u") else stem)):
        if cand in files:
            return files[cand], ""
        m = re.fullmatch(r"(yolo(?:e-)?v?\d+)([nslmx])(.*)", cand)
        if m and f"{m[1]}{m[3]}" in files:
            return files[f"{m[1]}{m[3]}"], m[2]
    close = difflib.get_close_matches(stem, list(files), n=1)
    hint = f" did you mean '{PREFIX}{close[0]}'?" if close else ""
    raise PrunekitError(f"unknown Ultralytics model '{name}':{hint} give a yaml name Ultralytics ships, with its "
                        "scale letter, e.g. ul:yolov8n, ul:yolo11s, ul:yolov3u, ul:yolov3-tinyu, ul:yolov5nu")


# ---- building ----
def create(name: str, num_classes: int | None = 80, **kwargs: Any) -> nn.Module:
    """Build ``ul:<name>`` as a traceable ``DetectionModel`` with freshly initialised weights, or
    ``ul:path/to/best.pt`` (with ``trust_pickle=True``) as the detector Ultralytics trained there: its
    architecture, weights and class names (``model.names``; ``num_classes`` None takes its count).

    kwargs: ``imgsz`` (the square input size recorded as the model's input shape, default 640),
    ``weights_path`` (a state dict, or with ``trust_pickle=True`` a trained Ultralytics ``.pt``).
    The model carries ``prunekit_arch`` (the recipe ``prunekit.save`` records; paths and the trust flag
    are left out) and ``prunekit_protected`` (names of the layers pruning must keep).
    """
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise PrunekitError(f"model '{name}' does not take {', '.join(unknown)}; allowed kwargs: {', '.join(_KWARGS)}")
    if num_classes is not None and num_classes < 1:
        raise PrunekitError(f"num_classes must be >= 1, got {num_classes}")
    imgsz = kwargs.get("imgsz", DEFAULT_IMGSZ)
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz < 32 or imgsz % 32:
        raise PrunekitError(f"imgsz must be a multiple of 32 (the largest YOLO stride), got {imgsz!r}")
    names = None
    if name.removeprefix(PREFIX).endswith(".pt"):  # ul:path/to/best.pt: the user's trained detector
        if kwargs.get("weights_path") is not None:
            raise PrunekitError(f"'{name}' brings its own weights: drop weights_path")
        name, num_classes, names, state = _trained(Path(name.removeprefix(PREFIX)).expanduser(), num_classes,
                                                  trust_pickle=kwargs.get("trust_pickle", False))
        model = build_detection_model(name, num_classes)
        model.load_state_dict(state)
    else:
        num_classes = 80 if num_classes is None else num_classes  # Ultralytics' COCO head
        model = build_detection_model(name, num_classes)
    if kwargs.get("weights_path") is not None:
        load_weights(model, Path(kwargs["weights_path"]), num_classes, trust_pickle=kwargs.get("trust_pickle", False))
    if names is not None:
        model.names = names  # its class names, which a pipeline checks against the data's
    make_traceable(model)
    model.prunekit_arch = {"name": name, "num_classes": num_classes,
                           "kwargs": {"imgsz": imgsz} if "imgsz" in kwargs else {}, "input_shape": [3, imgsz, imgsz]}
    model.prunekit_protected = [n for n, m in model.named_modules() if m in set(protected_layers(model))]
    model.prunekit_outputs = predictions
    return model


def check_trust(trust_pickle: object) -> None:
    """Only ``True`` trusts a pickle: a truthy string such as ``'no'`` must not run a file's code."""
    if trust_pickle is not True and trust_pickle is not False:
        raise PrunekitError(f"trust_pickle must be True or False, got {trust_pickle!r}")


def _trained(path: Path, num_classes: int | None, *, trust_pickle: bool) -> tuple[str, int, dict, dict]:
    """(``ul:`` name of its architecture, classes, class names, weights) of a detector Ultralytics trained."""
    check_trust(trust_pickle)
    if not path.is_file():
        raise PrunekitError(f"Ultralytics checkpoint not found: {path}")
    if not trust_pickle:
        raise PrunekitError(f"{path} is an Ultralytics checkpoint, a Python pickle: loading one runs whatever code it "
                            "holds; pass trust_pickle: true (--trust-pickle) only for a file you trust (e.g. one you "
                            "trained yourself)")
    obj = _pickled_model(path)
    cfg = getattr(obj, "yaml", None)
    if not isinstance(cfg, dict):
        raise PrunekitError(f"{path} holds no Ultralytics model (expected a checkpoint with 'model' or 'ema')")
    stem = Path(str(cfg.get("yaml_file") or "")).stem
    arch = f"{PREFIX}{stem}" if stem else ""
    try:
        resolve(arch)
    except PrunekitError as exc:
        raise PrunekitError(f"{path} was built from {cfg.get('yaml_file') or 'a yaml dict'!r}, not a yaml Ultralytics "
                            "ships; prunekit rebuilds shipped architectures only (yolov3u, v5u, v8, 11, ...)") from exc
    names = {int(k): str(v) for k, v in dict(getattr(obj, "names", {}) or {}).items()}
    nc = int(cfg.get("nc") or len(names))
    if num_classes is not None and num_classes != nc:
        raise PrunekitError(f"{path} predicts {nc} classes, not num_classes={num_classes}")
    return arch, nc, names or {i: str(i) for i in range(nc)}, _float_state(obj)


def input_size(model: nn.Module) -> int:
    """The square image size the detector was built for (its recorded input shape), else Ultralytics' 640."""
    shape = (getattr(model, "prunekit_arch", None) or {}).get("input_shape") or [3, DEFAULT_IMGSZ, DEFAULT_IMGSZ]
    return int(shape[-1])


def predictions(out: Any) -> list[torch.Tensor]:
    """The tensors of an eval forward that are the detector's results (decoded boxes and scores, raw box and
    class maps), without the neck's feature maps Ultralytics also returns: pruning may narrow those."""
    if isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], dict):
        return [out[0], *(v for k, v in out[1].items() if k != "feats" and isinstance(v, torch.Tensor))]
    return [t for t in (out if isinstance(out, tuple | list) else [out]) if isinstance(t, torch.Tensor)]


def build_detection_model(name: str, num_classes: int) -> nn.Module:
    """Ultralytics' own ``DetectionModel`` for ``ul:<name>``, before any rewrite (eval mode)."""
    ultralytics()
    from ultralytics.nn.tasks import DetectionModel, guess_model_task
    from ultralytics.utils import YAML

    path, scale = resolve(name)
    cfg = YAML.load(path)
    if scale and scale not in (cfg.get("scales") or {}):
        scales = ", ".join(cfg.get("scales") or []) or "none"
        raise PrunekitError(f"{path.name} has no scale '{scale}'; it has {scales}")
    cfg |= {"scale": scale, "yaml_file": f"{name.removeprefix(PREFIX).removesuffix('.yaml')}.yaml"}
    if (task := guess_model_task(cfg)) != "detect":
        raise PrunekitError(f"'{name}' is a {task} model; prunekit supports Ultralytics detectors only")
    return DetectionModel(cfg, ch=3, nc=num_classes, verbose=False).eval()


def load_weights(model: nn.Module, path: Path, num_classes: int, *, trust_pickle: bool = False) -> None:
    """Load a state dict, or (``trust_pickle=True``) the model inside a trained Ultralytics ``.pt``."""
    check_trust(trust_pickle)
    if not path.is_file():
        raise PrunekitError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        if not trust_pickle:
            raise PrunekitError(
                f"{path} is not a plain state dict: Ultralytics .pt checkpoints are Python pickles, and loading "
                "one runs whatever code it holds; pass trust_pickle=True only for a file you trust (e.g. one "
                "you trained yourself)") from exc
        state = _float_state(_pickled_model(path))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict, ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PrunekitError(f"{path} holds no state dict of tensors")
    expected = model.state_dict()
    head = model.model[-1]
    class_convs = {f"model.{head.i}.cv3.{level}.{len(seq) - 1}.weight" for level, seq in enumerate(head.cv3)}
    for key in class_convs & set(state):
        value, want = state[key], expected[key]
        if value.shape[0] != want.shape[0]:
            raise PrunekitError(f"the head in {path} predicts {value.shape[0]} classes but num_classes="
                                f"{num_classes}; pass num_classes={value.shape[0]}")
    if any(".cv1a." in k for k in state):  # trained by prunekit (yolo.train): split blocks, rewrite first
        make_traceable(model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise PrunekitError(f"weights in {path} do not fit this model: {detail[:300]}") from exc


def _pickled_model(path: Path) -> nn.Module:
    """The model inside a trusted Ultralytics ``.pt`` (its EMA when it has one, as Ultralytics loads it)."""
    ultralytics()  # the pickle names Ultralytics classes
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged or foreign pickle raises anything
        raise PrunekitError(f"cannot read {path} as an Ultralytics checkpoint ({type(exc).__name__}: {exc})") from exc
    obj = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if not isinstance(obj, nn.Module):
        raise PrunekitError(f"{path} holds no Ultralytics model (expected a checkpoint with 'model' or 'ema')")
    return obj


def _trained_state(ckpt: dict) -> dict[str, torch.Tensor] | None:
    """The weights of an Ultralytics checkpoint (its EMA when it has one, as Ultralytics loads it), in float32."""
    obj = ckpt.get("ema") or ckpt.get("model")
    return _float_state(obj) if isinstance(obj, nn.Module) else None


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}


# ---- the traceable rewrite ----
class SplitC2f(nn.Module):
    """``C2f``/``C3k2`` with ``cv1`` as two convs, one per half: no ``chunk`` on a prunable tensor."""

    def __init__(self, cv1a: nn.Module, cv1b: nn.Module, m: nn.ModuleList, cv2: nn.Module):
        super().__init__()
        self.cv1a, self.cv1b, self.m, self.cv2 = cv1a, cv1b, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitC2PSA(nn.Module):
    """``C2PSA`` with ``cv1`` as two convs: the attention half and the bypass half are separate layers."""

    def __init__(self, cv1a: nn.Module, cv1b: nn.Module, m: nn.Sequential, cv2: nn.Module):
        super().__init__()
        self.cv1a, self.cv1b, self.m, self.cv2 = cv1a, cv1b, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


@torch.no_grad()
def split_conv(conv: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """Ultralytics ``Conv`` (conv, BN, activation) cut by output channels into exact independent parts."""
    parts, start = [], 0
    for size in sizes:
        part = copy.deepcopy(conv)
        sl = slice(start, start + size)
        part.conv.weight = nn.Parameter(conv.conv.weight[sl].clone())
        part.conv.out_channels = size
        if conv.conv.bias is not None:
            part.conv.bias = nn.Parameter(conv.conv.bias[sl].clone())
        bn = part.bn
        bn.num_features = size
        bn.weight, bn.bias = nn.Parameter(conv.bn.weight[sl].clone()), nn.Parameter(conv.bn.bias[sl].clone())
        bn.running_mean, bn.running_var = conv.bn.running_mean[sl].clone(), conv.bn.running_var[sl].clone()
        parts.append(part)
        start += size
    return parts


def make_traceable(model: nn.Module) -> nn.Module:
    """Replace every ``C2f``/``C3k2``/``C2PSA`` in ``model`` by its split equivalent (in place; same outputs).

    Subclasses that change ``forward`` (e.g. ``C2fAttn``) are left as they are.
    """
    ultralytics()
    from ultralytics.nn.modules.block import C2PSA, C2f

    from ..graph import set_module

    for name, mod in list(model.named_modules()):
        if type(mod).forward is C2f.forward:
            new: nn.Module = SplitC2f(*split_conv(mod.cv1, [mod.c, mod.c]), mod.m, mod.cv2)
        elif type(mod).forward is C2PSA.forward:
            new = SplitC2PSA(*split_conv(mod.cv1, [mod.c, mod.c]), mod.m, mod.cv2)
        else:
            continue
        if hasattr(mod, "np"):  # set_module carries over the routing attributes f, i, type
            new.np = sum(p.numel() for p in new.parameters())
        new.train(mod.training)
        set_module(model, name, new)
    return model


# ---- what pruning must keep ----
def _detect_heads(model: nn.Module) -> list[nn.Module]:
    from ultralytics.nn.modules.head import Detect

    return [m for m in model.modules() if isinstance(m, Detect)]


def head_layers(model: nn.Module) -> list[nn.Module]:
    """The Detect head's output convs: box (4·reg_max), class (nc) and DFL, whose channels are the predictions."""
    ultralytics()
    layers: list[nn.Module] = []
    for det in _detect_heads(model):
        for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
            for seq in getattr(det, branch, None) or []:
                layers.append(seq[-1])
        if isinstance(getattr(det.dfl, "conv", None), nn.Conv2d):
            layers.append(det.dfl.conv)
    return layers


def protected_layers(model: nn.Module) -> list[nn.Module]:
    """``head_layers`` plus the convs of attention blocks, whose forward views channels as (heads, dims).

    Pass these as ``ignored_layers``; any coupled group with one of them as producer stays whole (so the
    attention's residual stream keeps its width, while its feed-forward hidden layer can still shrink).
    """
    from ultralytics.nn.modules.block import Attention

    layers = head_layers(model)
    for m in model.modules():
        if isinstance(m, Attention):
            layers += [m.qkv.conv, m.pe.conv, m.proj.conv]
    return layers


@contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the eval forward returns only the decoded predictions (B, 4 + nc, anchors).

    Ultralytics' eval forward returns (predictions, raw head outputs); ONNX export and ONNX Runtime
    comparisons want one tensor, which Ultralytics' own exporter gets by this same flag.
    """
    heads = _detect_heads(model)
    saved = [h.__dict__.get("export") for h in heads]
    for h in heads:
        h.export = True
    try:
        yield model
    finally:
        for h, s in zip(heads, saved, strict=True):
            if s is None:
                del h.export
            else:
                h.export = s
