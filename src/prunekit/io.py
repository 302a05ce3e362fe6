"""Atomic files and portable model files.

A model file holds an architecture *recipe* (zoo or torchvision name, its kwargs, and the
shape attributes of every layer, plus which blocks were replaced by identity) next to the
state dict. Only plain Python values and tensors are stored, so ``torch.load(path,
weights_only=True)`` reads it and no pickled code ever runs. Pruned models load by building
the base architecture and shrinking each layer to the recorded shapes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PrunekitError

FORMAT = "prunekit-model"
VERSION = 1
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write with torch.save to a temp file, fsync it, then rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or exc
            raise PrunekitError(f"cannot write {path}: {reason}; check free space and permissions") from exc
        raise


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True and a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"checkpoint {path} does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunekitError(f"checkpoint {path} is corrupt or truncated ({first[:120]}); re-create it") from exc
    if not isinstance(obj, dict):
        raise PrunekitError(f"checkpoint {path} is not a prunekit file; save models with prunekit.save")
    return obj


def arch_of(model: nn.Module) -> dict:
    """The recipe that rebuilds ``model``'s architecture, including any pruning applied to it."""
    base = getattr(model, "prunekit_arch", None)
    if base is None:
        raise PrunekitError(
            "this model was not created by prunekit.models.create, so its architecture cannot be recorded; "
            "create it with prunekit.models.create (zoo or 'tv:<name>') or save its state_dict yourself"
        )
    layers: dict[str, dict[str, int]] = {}
    identities: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Identity) and name:
            identities.append(name)
        attrs = {a: int(getattr(m, a)) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), int)}
        if attrs:
            layers[name] = attrs
    return {"name": base["name"], "num_classes": base["num_classes"], "kwargs": dict(base["kwargs"]),
            "input_shape": list(base.get("input_shape") or []), "layers": layers, "identities": identities}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (used for pruned-away blocks)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def build(arch: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a (possibly pruned) model from ``arch_of``'s recipe and load ``state`` into it."""
    from . import models  # models sit beside io; imported late to keep io importable on its own

    model = models.create(arch["name"], num_classes=arch["num_classes"], **arch["kwargs"])
    for name in arch.get("identities", []):
        set_module(model, name, nn.Identity())
    modules = dict(model.named_modules())
    for name, attrs in arch.get("layers", {}).items():
        m = modules.get(name)
        if m is None:
            raise PrunekitError(f"model file does not match architecture {arch['name']}: no layer {name!r}")
        for a, v in attrs.items():
            setattr(m, a, v)
    if state is not None:
        # Resize every tensor to the recorded shape, then load values; requires_grad is preserved.
        for key, value in state.items():
            mod_name, _, attr = key.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            cur = getattr(mod, attr, None)
            if isinstance(cur, torch.Tensor) and cur.shape != value.shape:
                if isinstance(cur, nn.Parameter):
                    setattr(mod, attr, nn.Parameter(torch.empty_like(value), requires_grad=cur.requires_grad))
                else:
                    mod.register_buffer(attr, torch.empty_like(value))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PrunekitError(f"weights do not fit architecture {arch['name']}: {str(exc).splitlines()[0]}") from exc
    model.prunekit_arch = {"name": arch["name"], "num_classes": arch["num_classes"], "kwargs": dict(arch["kwargs"]),
                           "input_shape": list(arch.get("input_shape") or [])}
    return model


def model_record(model: nn.Module) -> dict:
    """Everything needed to rebuild ``model`` elsewhere: recipe and CPU state dict."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    return {"arch": arch_of(_unwrap(model)), "state": state}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save(model: nn.Module, path: str | Path, **meta: Any) -> None:
    """Save a zoo/torchvision model (pruned or not) so that ``load`` rebuilds it in a fresh process."""
    atomic_save({"format": FORMAT, "version": VERSION, **model_record(model), "meta": meta}, path)


def load(path: str | Path) -> nn.Module:
    """Load a model written by ``save`` (or a training checkpoint) with weights_only semantics."""
    obj = safe_load(path)
    if obj.get("format") == "prunekit-sparse":  # written by `prunekit export --format sparse`
        from .sparse import load_sparse

        return load_sparse(path)
    return build_from_record(obj, path)


def build_from_record(obj: dict, path: str | Path = "<memory>") -> nn.Module:
    """Rebuild the model held in a loaded prunekit file (model file or training checkpoint)."""
    fmt = obj.get("format")
    if fmt not in (FORMAT, "prunekit-train"):
        raise PrunekitError(f"{path} is not a prunekit model file (format {fmt!r}); save models with prunekit.save")
    if int(obj.get("version", 0)) > VERSION:
        raise PrunekitError(
            f"{path} was written by a newer prunekit (format version {obj['version']} > {VERSION}); upgrade prunekit"
        )
    record = obj if "arch" in obj else obj.get("model", {})
    if "arch" not in record or "state" not in record:
        raise PrunekitError(f"{path} holds no model; it may be truncated")
    model = build(record["arch"], record["state"])
    model.eval()
    return model
