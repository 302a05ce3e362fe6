"""Ultralytics YOLO detectors as prunekit models (the optional extra ``prunekit[yolo]``).

Ultralytics is AGPL-3.0, so it is never a core dependency: this module imports it only inside
``ultralytics()``, which first switches off everything in it that reaches the network (connectivity
probe, analytics events, pip auto-install, font download, logger integrations) and keeps its
settings, fonts and runs in a prunekit-controlled directory.

``create("ul:yolov8n", num_classes=3)`` builds the ``DetectionModel`` from the yaml shipped with
Ultralytics (never a download) and rewrites the modules that split a tensor's channels with
``chunk``/``split`` (``C2f``, ``C3k2``, ``C2PSA``) into equivalent ones whose halves come from two
separate convs, so Torch-Pruning can trace which channels go where. ``head_layers`` and
``protected_layers`` name the layers pruning must leave alone: the head's box, class and DFL outputs
and the attention layers whose forward reshapes channels into heads.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io as io_
import json
import logging
import os
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import files
from ..errors import PrunekitError
from . import data  # prunekit.yolo.data: VOC -> YOLO layout (needs no Ultralytics)
from .distill import HeadDistill

PREFIX = "ul:"
DEFAULT_IMGSZ = 640
_KWARGS = ("imgsz", "weights_path", "trust_pickle")
_module: ModuleType | None = None


# ---- importing Ultralytics without network access ----
def config_dir() -> Path:
    """Where Ultralytics keeps its settings, fonts and default runs: ``$PRUNEKIT_CACHE/ultralytics``."""
    root = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit").expanduser()
    return root / "ultralytics"


def ultralytics() -> ModuleType:
    """The ``ultralytics`` package, imported with everything that would reach the network switched off.

    The environment is set before the first import because Ultralytics decides at import time whether
    it is online (a DNS probe), where its settings live and whether it may pip-install packages; the
    module-level flags are set again afterwards in case the user imported it first. Fonts for its
    plots are matplotlib's DejaVu Sans copied under the names it would otherwise download.
    """
    global _module
    if _module is not None:
        return _module
    cfg = config_dir()
    cfg.mkdir(parents=True, exist_ok=True)
    os.environ.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(cfg),
                       "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1"})
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # the Platform callbacks upload runs when a key is set
    user_dir = cfg / "Ultralytics"  # Ultralytics' own layout under YOLO_CONFIG_DIR
    _install_fonts(user_dir)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its first-run settings notice must not land in stdout
            import ultralytics as ul
            from ultralytics import utils as ul_utils
            from ultralytics.utils import checks, events
    except ImportError as exc:
        raise PrunekitError("Ultralytics detectors need the optional extra: pip install 'prunekit[yolo]' "
                            f"(Ultralytics is AGPL-3.0, so it is not installed by default) [{exc}]") from exc
    ul.settings.update(sync=False, api_key="", clearml=False, comet=False, dvc=False, mlflow=False, raytune=False,
                       tensorboard=False, wandb=False, vscode_msg=False, openvino_msg=False,
                       datasets_dir=str(cfg / "datasets"), weights_dir=str(cfg / "weights"), runs_dir=str(cfg / "runs"))
    for mod in (ul_utils, checks, events):
        if hasattr(mod, "ONLINE"):
            mod.ONLINE = False
    checks.AUTOINSTALL = False
    checks.USER_CONFIG_DIR = user_dir  # where check_font looks before it would download
    events.events.enabled = False
    for handler in logging.getLogger("ultralytics").handlers:  # its log goes to stderr, wherever that points
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            handler.setStream(_Current("stderr"))  # stdout stays clean for prunekit's own output (--json)
    _module = ul
    return ul


class _Current:
    """A stream that is whatever ``sys.stderr`` (or ``sys.stdout``) is when written to: Ultralytics binds its log
    handler to the stream of its import, which a redirection (a notebook, a test's capture) may close later."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def _install_fonts(folder: Path) -> None:
    """Ultralytics downloads Arial for plot labels when it is missing; give it a bundled font instead."""
    import matplotlib

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists() and src.is_file():
            shutil.copyfile(src, folder / name)


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



# ---- training through Ultralytics ----
# Settings prunekit gives the trainer itself: in a pipeline they have their own keys.
OWN_SETTINGS = {"epochs": "the stage's epochs", "batch": "the stage's batch_size", "seed": "the stage's seed",
                "imgsz": "data.image_size", "device": "the config's device", "data": "data.name",
                "model": "model", "project": "the run's out", "name": "the run's out", "exist_ok": "the run's out",
                "save_dir": "the run's out",
                "resume": "re-running the config", "pretrained": "model.checkpoint"}


def check_settings(settings: Any, where: str = "ultralytics") -> None:
    """Ultralytics train settings checked by Ultralytics' own config check, before any stage runs; a key prunekit
    sets itself, or one of prunekit's own names, is refused naming the right key."""
    if not isinstance(settings, dict):
        raise PrunekitError(f"{where} must be a mapping of Ultralytics train settings (lr0, optimizer, mosaic, ...)")
    for key in settings:
        if key in OWN_SETTINGS:
            raise PrunekitError(f"{where}.{key} is set by prunekit: use {OWN_SETTINGS[key]} instead")
        if key == "lr":
            raise PrunekitError(f"{where}.lr: Ultralytics calls the learning rate lr0")
    ultralytics()
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg, check_dict_alignment

    try:
        with quiet(logging.CRITICAL), contextlib.redirect_stdout(io_.StringIO()):  # its check logs the CLI help
            check_dict_alignment(DEFAULT_CFG_DICT, dict(settings))
            check_cfg(dict(settings))
    except (SyntaxError, ValueError, TypeError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise PrunekitError(f"{where}: {' '.join(text[:1])[:200]}") from None


@contextmanager
def quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Ultralytics' logger at ``level`` inside the block: its tables and help texts are not prunekit's output
    (a CLI printing JSON to stdout must not get them mixed in)."""
    logger = logging.getLogger("ultralytics")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def train(model: nn.Module, dataset: str | Path, *, epochs: int = 1, imgsz: int | None = None, batch: int = 16,
          device: str = "cpu", project: str | Path | None = None, name: str = "train",
          after_backward: Callable[[nn.Module], None] | None = None, keep: str = "best", resume: bool = False,
          distill: tuple[nn.Module, float, float] | None = None, log_path: str | Path | None = None,
          **overrides: Any) -> dict[str, float]:
    """Train or fine-tune ``model`` (pruned or not) with Ultralytics' ``DetectionTrainer`` and return its metrics.

    Ultralytics' trainer normally rebuilds the network from its yaml, which silently undoes pruning;
    here the trainer is handed prunekit's model object and keeps it, so the architecture trained is the
    one passed in. ``dataset`` is a YOLO data yaml or a Pascal VOC directory (converted by
    ``yolo.data.detection_data``). ``overrides`` are any Ultralytics train arguments (lr0, workers,
    fraction, ...). Afterwards ``model`` holds the weights of the best epoch (EMA, as Ultralytics keeps
    them, judged on the val split; ``keep="last"``: of the last epoch, which sparsity training needs, as
    its best mAP is usually its least sparse epoch) in float32 and eval mode; the returned metrics are
    Ultralytics' validator's on the epoch that ``best`` picked (``metrics/mAP50(B)``, ``metrics/mAP50-95(B)``, ...).

    ``after_backward`` (e.g. ``train.BNSparsity``, the sparsity training of S0/S3) runs on the model before
    every optimiser step, after the gradients are unscaled and before Ultralytics clips their norm: the clip
    then bounds the gradient of the regularised objective and keeps the ratio between the loss's pull on a
    γ and the penalty's (added after the clip, the penalty would shrink every γ alike). Ultralytics sums
    its loss over the images of a batch and accumulates ``nbs / batch`` batches per step, so the model's
    gradients are that many times those of a mean loss; the hook's rate ``s`` is multiplied by the same
    factor, so that ``s`` means what it means in classification training (s·Σ|γ| beside a mean loss).

    ``log_path``: each epoch's validation metrics (in %) are appended there as JSON lines (a run's curve).

    ``resume``: when ``project/name/weights/last.pt`` holds an unfinished run (killed mid-training), continue
    it from its next epoch with its optimiser, EMA and best-so-far, the weights loaded into ``model`` (which
    must have the architecture that run trained); Ultralytics' own resume would rebuild the model instead.
    A finished or missing run starts afresh.

    ``distill=(teacher, alpha, temperature)``: Ultralytics' loss plus α times the head distillation of
    ``prunekit.yolo.distill`` (the teacher in eval mode, on the same batches).
    """
    ultralytics()
    from ultralytics.engine import trainer as ul_trainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    if keep not in ("best", "last"):
        raise PrunekitError(f"keep must be 'best' or 'last', got {keep!r}")
    ds = data.detection_data(dataset)
    head = _detect_heads(model)
    if not head or head[-1].nc != len(ds.names):
        raise PrunekitError(f"the model predicts {head[-1].nc if head else 0} classes but {ds.yaml} has "
                            f"{len(ds.names)} ({', '.join(ds.names)}); build it with num_classes={len(ds.names)}")
    # An absolute project: Ultralytics puts a relative one under its own runs folder, where two runs that
    # name the same relative folder from two places would share (and overwrite) one another's weights.
    project = Path(project or config_dir() / "runs").expanduser().absolute()
    args = {"model": f"{model.yaml.get('yaml_file', 'prunekit')}", "data": str(ds.yaml), "epochs": epochs,
            "imgsz": imgsz or input_size(model), "batch": batch, "device": device, "name": name, "exist_ok": True,
            "project": str(project), "pretrained": False, "plots": False} | overrides
    # Resuming, Ultralytics takes the run folder from the checkpoint: a copied or moved run would write into
    # the original's. The folder is this run's, every time.
    args["save_dir"] = str(project / name)
    _refuse_links(project / name)

    resumed = None
    last = project / name / "weights" / "last.pt"
    signatures = project / name / "prunekit-signatures.json"
    if resume and last.is_file() and not _signed(last, signatures):
        warnings.warn(f"{last} was not written by prunekit on this machine (or changed since): a pickle, so it is "
                      "not opened; the stage trains afresh", stacklevel=2)
    elif resume and last.is_file():
        ckpt = _load_signed(last, signatures)
        if ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0:  # finished runs drop both
            args["resume"], resumed = str(last), ckpt
            try:
                model.load_state_dict(_trained_state(ckpt))
            except RuntimeError as exc:
                raise PrunekitError(f"cannot resume {last}: it trained another architecture than this model "
                                    f"({' '.join(str(exc).split())[:200]})") from exc

    class KeepModelTrainer(DetectionTrainer):
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
            return model

        def _setup_train(self) -> None:
            """With ``distill``: the distilling criterion, once the trainer has given the model its hyper-parameters
            (the EMA copy made here keeps Ultralytics' plain criterion for validation)."""
            super()._setup_train()
            if distill is not None:
                teacher, alpha, temperature = distill
                model.criterion = HeadDistill(model.init_criterion(), teacher.to(self.device).float().eval(), alpha,
                                              temperature)

        def setup_model(self) -> dict | None:
            """The model is prunekit's, never built here; the checkpoint to resume from, if any, goes on to
            ``resume_training`` (epoch, optimiser, EMA)."""
            return resumed

        @contextmanager
        def _signed_writes(self, copy_first: bool) -> Iterator[None]:
            """Ultralytics writes its checkpoints to pending files; they are signed, then moved into place. A kill
            at any point leaves each checkpoint either as it was or as written, signed either way, so an
            interrupted epoch costs that epoch only (never the run: an unsigned last.pt restarts it)."""
            final = (Path(self.last), Path(self.best))
            pending = tuple(p.with_name(f".{p.stem}.pending{p.suffix}") for p in final)
            for f, p in zip(final, pending, strict=True):
                p.unlink(missing_ok=True)  # a kill's leftover (or a planted link): never written through
                if copy_first and f.is_file():
                    shutil.copyfile(f, p)
            self.last, self.best = pending
            try:
                yield
            except BaseException:
                for p in pending:
                    p.unlink(missing_ok=True)
                raise
            finally:
                self.last, self.best = final
            old = _signatures(signatures)
            new = {f.name: files.file_signature(p) for f, p in zip(final, pending, strict=True) if p.is_file()}
            files.atomic_write_text(json.dumps(old | {k: [old.get(k), v] for k, v in new.items()}), signatures)
            for f, p in zip(final, pending, strict=True):
                if p.is_file():
                    os.replace(p, f)
            files.atomic_write_text(json.dumps(old | new), signatures)

        def save_model(self) -> bool:
            """Ultralytics' checkpoints, signed as this machine's prunekit's own (the only pickles it reopens)."""
            with self._signed_writes(copy_first=False):
                return super().save_model()

        def final_eval(self) -> None:
            """Ultralytics strips the optimiser from both checkpoints here, in place: sign what it leaves."""
            with self._signed_writes(copy_first=True):
                super().final_eval()

        def optimizer_step(self) -> None:
            """Ultralytics' own step (unscale, clip, step, EMA), the regulariser added to the unscaled gradients
            first: the gradients are unscaled here, and Ultralytics' second unscale is skipped for this call
            only (a GradScaler refuses a second one), so no line of its step is copied."""
            if after_backward is None:
                return super().optimizer_step()
            self.scaler.unscale_(self.optimizer)
            with _scaled(after_backward, self.batch_size * self.accumulate):
                after_backward(self.model)
            self.scaler.unscale_ = lambda optimizer: None  # already done above
            try:
                return super().optimizer_step()
            finally:
                del self.scaler.unscale_  # the scaler's own method again

    trainer = KeepModelTrainer(overrides=args)
    trainer.model = model
    epochs_seen: list[dict[str, float]] = []

    def epoch_end(tr: Any) -> None:
        """Each epoch's validation metrics: the run log's curve, and what ``keep="last"`` keeps (the final
        evaluation of best.pt after the last epoch calls this too, past the last epoch: not an epoch)."""
        if tr.epoch >= tr.epochs:
            return
        epochs_seen.append({k: float(v) for k, v in (tr.metrics or {}).items()})
        if log_path is not None and tr.metrics:
            row = {"epoch": tr.epoch + 1, **{f"val_{k}": 100 * epochs_seen[-1][v]
                                             for k, v in METRICS.items() if v in epochs_seen[-1]}}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    trainer.add_callback("on_fit_epoch_end", epoch_end)
    # Its AMP self-test downloads yolo26n.pt; prunekit never downloads, so AMP is used on CUDA untested. Patched
    # for this training only: Ultralytics' own function is back afterwards, whatever happens.
    check_amp = ul_trainer.check_amp
    ul_trainer.check_amp = lambda m: next(m.parameters()).device.type == "cuda"
    try:
        trainer.train()
    finally:
        ul_trainer.check_amp = check_amp
        model.criterion = None  # never keep the teacher inside the model

    chosen = trainer.best if keep == "best" else trainer.last
    if chosen.is_file():
        model.load_state_dict(_trained_state(_load_signed(chosen, signatures)))
    model.float().eval()
    if keep == "last" and epochs_seen:  # the metrics of the epoch kept, not of best.pt's final evaluation
        return epochs_seen[-1]
    return {k: float(v) for k, v in (trainer.metrics or {}).items()}


def _refuse_links(run: Path) -> None:
    """Ultralytics writes its checkpoints, results and args with plain writes that follow a symbolic link to
    wherever it points: refuse a run folder holding one where it writes (one line, before training)."""
    for p in (run, run / "weights", run / "weights" / "last.pt", run / "weights" / "best.pt", run / "results.csv",
              run / "args.yaml", run / "prunekit-signatures.json"):
        if p.is_symlink():
            raise PrunekitError(f"{p} is a symbolic link: prunekit never writes through a link (it would change "
                                "the file it points to); remove the link and run again")


def _signatures(signatures: Path) -> dict:
    """The run's signatures file (name → signature), empty when missing or damaged."""
    try:
        signed = json.loads(signatures.read_text()) if signatures.is_file() else {}
    except (OSError, ValueError):
        signed = {}
    return signed if isinstance(signed, dict) else {}


def _signed(path: Path, signatures: Path) -> bool:
    """Whether this machine's prunekit wrote ``path`` (its signature in ``signatures`` matches its bytes; while a
    checkpoint is being replaced, both the old and the new file's signatures are listed)."""
    entry = _signatures(signatures).get(path.name)
    return any(files.signed_by_us(path, s) for s in (entry if isinstance(entry, list) else [entry]))


def _load_signed(path: Path, signatures: Path) -> dict:
    """Unpickle an Ultralytics checkpoint only if this machine's prunekit wrote it, byte for byte."""
    if not _signed(path, signatures):
        raise PrunekitError(f"{path} was not written by prunekit on this machine (or changed since): a pickle, "
                            "so it is not opened; delete it (or use --force) to train the stage afresh")
    return torch.load(path, map_location="cpu", weights_only=False)  # signed: written by this trainer


@contextmanager
def _scaled(hook: Any, factor: float) -> Iterator[None]:
    """A ``BNSparsity``-like hook (attribute ``s``) with its rate multiplied by ``factor`` for one call."""
    s = getattr(hook, "s", None)
    if s is not None:
        hook.s = s * factor
    try:
        yield
    finally:
        if s is not None:
            hook.s = s


METRICS = {"mAP50-95": "metrics/mAP50-95(B)", "mAP50": "metrics/mAP50(B)", "precision": "metrics/precision(B)",
           "recall": "metrics/recall(B)"}


def validate(model: nn.Module, dataset: str | Path, *, split: str = "val", imgsz: int | None = None,
             batch: int = 16, device: str = "cpu", conf: float = 0.001, iou: float = 0.7,
             verbose: bool = False) -> dict[str, float]:
    """mAP50-95, mAP50, precision and recall of ``model`` on a split of ``dataset``, by Ultralytics' validator.

    The validator fuses conv and BN of the model it is given, so it gets a copy: ``model`` is unchanged.
    ``conf``/``iou`` are Ultralytics' validation defaults (the mAP protocol: low confidence, NMS IoU 0.7).
    Ultralytics' own log lines (its per-class table) are shown only with ``verbose``: a CLI printing JSON
    to stdout must not get them mixed in.
    """
    ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator

    ds = data.detection_data(dataset)
    if split not in ds.images:
        raise PrunekitError(f"{ds.yaml} has no split {split!r}; it has {', '.join(ds.images)}")
    args = {"data": str(ds.yaml), "split": split, "imgsz": imgsz or input_size(model), "batch": batch, "device": device,
            "conf": conf, "iou": iou, "plots": False, "verbose": False, "save_json": False,
            "project": str(config_dir() / "runs"), "name": "val", "exist_ok": True}
    validator = DetectionValidator(args=args)
    net = copy.deepcopy(model).float().eval()
    net.names = dict(enumerate(ds.names))
    with contextlib.nullcontext() if verbose else quiet():
        stats = validator(model=net)
    return {short: float(stats[key]) for short, key in METRICS.items()}
