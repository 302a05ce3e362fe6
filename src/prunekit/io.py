"""Atomic files and portable model files.

A model file holds an architecture *recipe* (zoo or torchvision name and kwargs, or for a user's own
``nn.Module`` its class name; the shape attributes of every layer, integers and tuples such as
``normalized_shape``; which blocks were replaced by identity) next to the state dict. Only plain
Python values and tensors are stored, so ``torch.load(path, weights_only=True)`` reads it and no
pickled code ever runs. Pruned models load by building the base architecture (or taking the
user's unpruned instance, ``load(path, model=MyNet())``) and shrinking each layer to the recorded
shapes; a parameter the state holds where the base has none (a bias added by compensation) is created.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import PrunekitError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write with torch.save to a temp file, fsync it, then rename, so a crash never leaves half a file.

    The file gets the permissions the umask gives a new file (mkstemp alone would make it 0600).
    """
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """``atomic_save`` for a text file (JSON, YAML, Markdown, HTML)."""
    _atomic(path, lambda f: f.write(text.encode()))


def _atomic(path: str | Path, write: Callable[[Any], Any]) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError | RuntimeError):  # torch's zip writer reports a full disk as a RuntimeError
            text = str(exc).strip().splitlines()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (text[0][:120] if text else exc)
            raise PrunekitError(f"cannot write {path}: {reason}; check the path, free space and permissions") from exc
        raise


@contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """One writer per run directory: an exclusive lock on ``DIR/.lock`` for the ``with`` block.

    The operating system drops the lock when its process dies, so a crashed or killed writer never
    leaves the directory stuck; a second writer is refused at once with the holder's pid.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PrunekitError(f"{directory} is a file; a run needs a directory: choose another output path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a+")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise PrunekitError(f"cannot write run directory {directory}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PrunekitError(f"{directory} is being written by {holder}; wait for it to finish or use another "
                                "output directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"prunekit pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True and a clear error for missing, truncated or foreign files."""
    if not isinstance(path, str | os.PathLike):
        raise PrunekitError(f"a model file path must be a string or Path, got {type(path).__name__}")
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


# ---- configs people write ----
MAX_CONFIG_NODES = 100_000  # a config far beyond any real one: an alias bomb expands past this


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (else the last would win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {str(key)[:40]!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:
                pass  # an unhashable key: the base class says so
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file people write, parsed safely: no duplicate keys, no alias bomb, errors in one line."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"{what} {path} does not exist")
    try:
        obj = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise PrunekitError(f"{what} {path} is not valid YAML{where}: {str(problem)[:160]}") from exc
    memo: dict[int, int] = {}

    def size(x: Any) -> int:  # nodes after expanding every alias, each shared node counted once per use
        if id(x) in memo:
            return memo[id(x)]
        items = list(x.items()) if isinstance(x, dict) else list(x) if isinstance(x, list) else []
        memo[id(x)] = n = 1 + sum(size(v) for kv in items for v in (kv if isinstance(x, dict) else (kv,)))
        if n > MAX_CONFIG_NODES:
            raise PrunekitError(f"{what} {path} expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases?); "
                                "refused")
        return n

    size(obj)
    return obj


# ---- files prunekit wrote itself ----
def _signing_key() -> bytes:
    """This machine's key for signing files prunekit wrote (``$PRUNEKIT_CACHE/signing.key``, made once, 0600).

    A run folder copied from elsewhere carries no signature made with this key, so nothing in it that
    only a pickle can read (Ultralytics' ``last.pt``) is ever unpickled.
    """
    root = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit").expanduser()
    path = root / "signing.key"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
        except FileExistsError:
            pass
    return path.read_bytes()


def file_signature(path: str | Path) -> str:
    """HMAC-SHA256 of the file's bytes under this machine's key."""
    mac = hmac.new(_signing_key(), digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            mac.update(chunk)
    return mac.hexdigest()


def signed_by_us(path: str | Path, signature: str | None) -> bool:
    """Whether ``path`` is byte for byte a file this machine's prunekit signed."""
    return isinstance(signature, str) and Path(path).is_file() and hmac.compare_digest(file_signature(path),
                                                                                         signature)


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


ROUTING_ATTRS = ("f", "i", "type")  # how Ultralytics' DetectionModel.forward finds each layer's inputs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (pruned-away blocks, rewritten modules).

    The replacement keeps the routing attributes a container reads from its layers (``ROUTING_ATTRS``),
    so a residual layer of a YOLO backbone can become an identity and still be fed the right input.
    """
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf, None)
    for attr in ROUTING_ATTRS:
        if hasattr(old, attr) and not hasattr(new, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(owner, leaf, new)


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
