"""Portable model files (the atomic file helpers they use are in ``prunekit.files``).

A model file holds an architecture *recipe* (zoo or torchvision name and kwargs, or for a user's own
``nn.Module`` its class name; the shape attributes of every layer, integers and tuples such as
``normalized_shape``; which blocks were replaced by identity) next to the state dict. Only plain
Python values and tensors are stored, so ``torch.load(path, weights_only=True)`` reads it and no
pickled code ever runs. Pruned models load by building the base architecture (or taking the
user's unpruned instance, ``load(path, model=MyNet())``) and shrinking each layer to the recorded
shapes; a parameter the state holds where the base has none (a bias added by compensation) is created.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PrunekitError
from .files import (  # noqa: F401  (prunekit.io is where callers have always found the file helpers)
    atomic_save,
    atomic_write_text,
    file_signature,
    read_json_mapping,
    read_signed_json,
    read_yaml,
    run_lock,
    safe_load,
    sha256_file,
    signed_by_us,
    write_signed_json,
)
from .graph import set_module

FORMAT = "prunekit-model"
VERSION = 1
# Attributes that shape a layer and that pruning changes (``hidden_dim``: torchvision ViT's width, which its
# forward reads); nothing else is ever set on a loaded module.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                "num_channels", "num_groups", "num_parameters", "embed_dim", "kdim", "vdim", "num_heads", "head_dim",
                "hidden_dim")
_TUPLE_ATTRS = ("normalized_shape",)
# Other file formats ``load`` reads (e.g. prunekit-sparse): format name -> loader(path, model).
DECODERS: dict[str, Any] = {}


def arch_of(model: nn.Module) -> dict:
    """The recipe that rebuilds ``model``'s architecture, including any pruning applied to it."""
    base = getattr(model, "prunekit_arch", None) or {"name": None, "num_classes": None, "kwargs": {}}
    layers: dict[str, dict[str, Any]] = {}
    identities: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Identity) and name:
            identities.append(name)
        attrs: dict[str, Any] = {a: int(getattr(m, a)) for a in _SHAPE_ATTRS
                                 if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)}
        attrs |= {a: [int(v) for v in getattr(m, a)] for a in _TUPLE_ATTRS if isinstance(getattr(m, a, None), tuple)}
        if attrs:
            layers[name] = attrs
    # Modules whose state loading depends on the version they were saved with (e.g. torchvision's MNASNet).
    versions = {prefix: int(meta["version"]) for prefix, meta in
                getattr(model.state_dict(), "_metadata", {}).items() if isinstance(meta.get("version"), int)}
    return {"name": base["name"], "num_classes": base["num_classes"], "kwargs": dict(base["kwargs"]),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "input_shape": list(base.get("input_shape") or []), "layers": layers, "identities": identities,
            "state_versions": versions}


# A model file names an architecture and its shape parameters, never a file to open or a trust flag:
# trust comes from the caller (``prunekit.models.create(..., weights_path=, trust_pickle=)``), never a file.
_FILE_KWARGS = ("weights_path", "trust_pickle", "weights", "cfg", "yaml", "path", "file", "url")
MAX_INPUT_ELEMENTS = 1 << 28  # an example input beyond 1 GiB of float32 is no image a model takes


def check_arch(arch: Any, path: str | Path = "<memory>") -> None:
    """The recipe's fields have the types ``arch_of`` writes, before any of them is used."""
    def plain(v: Any) -> bool:  # shape parameters: numbers and flags (a string could name a file)
        return v is None or isinstance(v, bool | int | float) or (
            isinstance(v, list | tuple) and all(plain(x) for x in v))

    fields = {
        "name": lambda v: v is None or (isinstance(v, str) and bool(v)),
        "num_classes": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "kwargs": lambda v: isinstance(v, dict) and all(isinstance(k, str) and plain(x) for k, x in v.items()),
        "layers": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, dict)
                                                        for k, x in v.items()),
        "identities": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "input_shape": lambda v: isinstance(v, list) and all(isinstance(x, int) and x > 0 for x in v),
        "state_versions": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, int)
                                                                for k, x in v.items()),
    }
    if not isinstance(arch, dict):
        raise PrunekitError(f"{path} is corrupt (its architecture is not a mapping); re-create it")
    kwargs = arch.get("kwargs") if isinstance(arch.get("kwargs"), dict) else {}
    named = sorted(str(k)[:40] for k in kwargs if any(f in str(k).lower() for f in _FILE_KWARGS))
    if named:
        raise PrunekitError(f"{path} names {named[0]!r} in its architecture recipe: a model file gives shape "
                            "parameters only, never a file to open or a trust flag; refused")
    for key, ok in fields.items():
        if key in arch and not ok(arch[key]):
            raise PrunekitError(f"{path} is corrupt (architecture field {key}={str(arch[key])[:60]!r}); re-create it")
    shape = arch.get("input_shape") or []
    if shape and (any(x > 65536 for x in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise PrunekitError(f"{path} records an input shape {shape[:4]} too large for any model input; refused")
    if arch.get("name") is not None and arch.get("num_classes") is None:
        raise PrunekitError(f"{path} is corrupt (architecture {arch['name']!r} without num_classes); re-create it")


def _check_recipe(arch: dict, modules: dict[str, nn.Module], what: str) -> None:
    """Refuse a recipe that names unknown layers or attributes before anything is changed."""
    for name, attrs in arch.get("layers", {}).items():
        if name not in modules or not isinstance(attrs, dict):
            raise PrunekitError(f"model file does not match {what}: no layer {name!r}")
        for a, v in attrs.items():
            ok = (a in _SHAPE_ATTRS and isinstance(v, int) and v >= 0) or \
                (a in _TUPLE_ATTRS and isinstance(v, list) and all(isinstance(i, int) for i in v))
            if not ok:
                raise PrunekitError(f"model file sets {name}.{a}={v!r}, which is not a layer shape the loader allows")
    for name in arch.get("identities", []):
        if name not in modules or not name:
            raise PrunekitError(f"model file does not match {what}: no block {name!r} to replace by identity")


def build(arch: dict, state: dict[str, torch.Tensor] | None = None, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a (possibly pruned) model from ``arch_of``'s recipe and load ``state`` into it.

    ``model``: an unpruned instance of the architecture, required for a user's own ``nn.Module``
    (the file records its class name, not its code); it is changed in place and returned.
    """
    from . import models  # models sit beside io; imported late to keep io importable on its own

    check_arch(arch)
    if model is None:
        if arch.get("name") is None:
            raise PrunekitError(f"this file holds a user-defined model ({arch.get('class', 'unknown class')}): "
                                "pass an unpruned instance, prunekit.load(path, model=MyNet(...))")
        model = models.create(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
    what = f"architecture {arch.get('name') or arch.get('class')}"
    modules = dict(model.named_modules())
    _check_recipe(arch, modules, what)
    for name in arch.get("identities", []):
        set_module(model, name, nn.Identity())
    modules = dict(model.named_modules())
    for name, attrs in arch.get("layers", {}).items():
        m = modules.get(name)
        if m is None:  # inside a block that became an identity
            continue
        for a, v in attrs.items():
            setattr(m, a, tuple(v) if a in _TUPLE_ATTRS else v)
    if state is not None:
        _resize_to(model, state, what)
        state = OrderedDict(state)
        state._metadata = {k: {"version": v} for k, v in arch.get("state_versions", {}).items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PrunekitError(f"weights do not fit {what}: {str(exc).splitlines()[0]}") from exc
    if arch.get("name") is not None:
        model.prunekit_arch = {"name": arch["name"], "num_classes": arch["num_classes"],
                               "kwargs": dict(arch["kwargs"]), "input_shape": list(arch.get("input_shape") or [])}
    elif arch.get("input_shape"):
        model.prunekit_arch = {"name": None, "num_classes": None, "kwargs": {}, "input_shape": arch["input_shape"]}
    return model


def _expected_shape(mod: nn.Module, attr: str) -> tuple[int, ...] | None:
    """The shape a layer's recorded attributes imply for one of its tensors (None: no rule for it)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        out, per_in = mod.out_channels, mod.in_channels // max(mod.groups, 1)
        if mod.transposed:  # weight is (in, out / groups, *kernel)
            return {"weight": (mod.in_channels, out // max(mod.groups, 1), *mod.kernel_size), "bias": (out,)}.get(attr)
        return {"weight": (out, per_in, *mod.kernel_size), "bias": (out,)}.get(attr)
    if isinstance(mod, nn.Linear):
        return {"weight": (mod.out_features, mod.in_features), "bias": (mod.out_features,)}.get(attr)
    if isinstance(mod, nn.modules.batchnorm._NormBase) and attr != "num_batches_tracked":
        return (mod.num_features,)
    if isinstance(mod, nn.LayerNorm) and attr in ("weight", "bias"):
        return tuple(mod.normalized_shape)
    return None


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Give every parameter and buffer the shape ``state`` holds (requires_grad kept); create missing ones
    that the module declares empty (a bias added by compensation where the layer had none)."""
    for key, value in state.items():
        mod_name, _, attr = key.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise PrunekitError(f"weights do not fit {what}: no module {mod_name!r} for {key!r}") from None
        if not isinstance(value, torch.Tensor):
            raise PrunekitError(f"weights do not fit {what}: {key!r} is not a tensor")
        cur = getattr(mod, attr, None)
        if isinstance(cur, torch.Tensor) and cur.is_floating_point() and not value.is_floating_point():
            raise PrunekitError(f"weights do not fit {what}: {key} is {str(value.dtype)[6:]}, not floating point; "
                                "the file is damaged or was edited")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise PrunekitError(f"{key} holds NaN or infinite values: the model is broken (training diverged?); "
                                "use an earlier checkpoint")
        want = _expected_shape(mod, attr)
        if want is not None and tuple(value.shape) != want:
            raise PrunekitError(f"weights do not fit {what}: {key} has shape {tuple(value.shape)} but the layer's "
                                f"recorded shape needs {want}; the file is damaged or was edited")
        if isinstance(cur, torch.Tensor) and cur.shape == value.shape:
            continue
        if isinstance(cur, nn.Parameter) or (cur is None and attr in mod._parameters):
            grad = cur.requires_grad if cur is not None else True
            setattr(mod, attr, nn.Parameter(torch.empty_like(value), requires_grad=grad))
        elif isinstance(cur, torch.Tensor) or (cur is None and attr in mod._buffers):
            mod.register_buffer(attr, torch.empty_like(value))


def model_record(model: nn.Module) -> dict:
    """Everything needed to rebuild ``model`` elsewhere: recipe and CPU state dict."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {"arch": arch_of(_unwrap(model)), "state": state}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save(model: nn.Module, path: str | Path, **meta: Any) -> None:
    """Save any model (pruned or not) so that ``load`` rebuilds it in a fresh process.

    Zoo and torchvision models load by name; a user's own ``nn.Module`` loads with
    ``load(path, model=<an unpruned instance>)``.
    """
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"save takes an nn.Module, got {type(model).__name__}")
    atomic_save({"format": FORMAT, "version": VERSION, **model_record(model), "meta": meta}, path)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by ``save`` (or a training checkpoint) with weights_only semantics.

    ``model``: an unpruned instance of a user-defined architecture (see ``build``).
    """
    obj = safe_load(path)
    if isinstance(obj.get("format"), str) and obj["format"] in DECODERS:  # e.g. `prunekit export --format sparse`
        return DECODERS[obj["format"]](path, model)
    return build_from_record(obj, path, model)


def recorded_name(path: str | Path) -> str | None:
    """The model name a prunekit file records (``ul:yolov8n``, ``resnet20``), without building the model, so a
    config that names only a checkpoint runs that model's task; None when the file does not say (loading it
    later reports why)."""
    try:
        obj = safe_load(path)
    except PrunekitError:
        return None
    record = obj if "arch" in obj else obj.get("model")
    arch = record.get("arch") if isinstance(record, dict) else None
    name = arch.get("name") if isinstance(arch, dict) else None
    return name if isinstance(name, str) else None


def build_from_record(obj: dict, path: str | Path = "<memory>", model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model held in a loaded prunekit file (model file or training checkpoint)."""
    fmt = obj.get("format")
    if fmt not in (FORMAT, "prunekit-train"):
        raise PrunekitError(f"{path} is not a prunekit model file (format {fmt!r}); save models with prunekit.save")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PrunekitError(f"{path} is corrupt (format version {version!r}); re-create it")
    if version > VERSION:
        raise PrunekitError(
            f"{path} was written by a newer prunekit (format version {version} > {VERSION}); upgrade prunekit"
        )
    record = obj if "arch" in obj else obj.get("model", {})
    if not isinstance(record, dict) or "arch" not in record or "state" not in record:
        raise PrunekitError(f"{path} holds no model; it may be truncated")
    if not isinstance(record["state"], dict):
        raise PrunekitError(f"{path} is corrupt (its state is not a mapping); re-create it")
    check_arch(record["arch"], path)
    model = build(record["arch"], record["state"], model)
    model.eval()
    return model
