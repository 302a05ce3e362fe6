"""Files written atomically, run locks, strict YAML and this machine's signatures: no prunekit imports
beyond errors, so any module may use them without an import circle."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import PrunekitError


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
            first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text[0]) if text else ""  # torch's C++ site
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (first[:120] or exc)
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
KEY_BYTES = 32


def _signing_key() -> bytes:
    """This machine's key for signing files prunekit wrote (``$PRUNEKIT_CACHE/signing.key``, made once, 0600).

    A run folder copied from elsewhere carries no signature made with this key, so nothing in it that
    only a pickle can read (Ultralytics' ``last.pt``) is ever unpickled. The key is written whole to a
    temporary file and linked into place (a full disk cannot leave a short key), and checked on every use:
    an empty, short, linked, shared or special file would make signatures forgeable (or, a FIFO, hang).
    """
    root = Path(os.environ.get("PRUNEKIT_CACHE") or Path.home() / ".cache" / "prunekit").expanduser()
    path = root / "signing.key"
    if not os.path.lexists(path):
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".signing.key.")
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600
                f.write(os.urandom(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if another process made the key first: theirs is used
        except FileExistsError:
            pass
        except OSError as exc:
            raise PrunekitError(f"cannot create the signing key {path}: {exc.strerror or exc}; free disk space "
                                "or set PRUNEKIT_CACHE to a writable folder") from exc
        finally:
            Path(tmp).unlink(missing_ok=True)
    st = os.lstat(path)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
               "is not owned by this user" if st.st_uid != os.getuid() else
               f"has mode {stat.S_IMODE(st.st_mode):o}, not 600" if stat.S_IMODE(st.st_mode) != 0o600 else
               f"holds {st.st_size} bytes, not {KEY_BYTES}" if st.st_size != KEY_BYTES else None)
    if problem is None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            key = f.read(KEY_BYTES + 1)
        if len(key) == KEY_BYTES:
            return key
        problem = f"holds {len(key)} bytes, not {KEY_BYTES}"
    raise PrunekitError(f"the signing key {path} {problem}: signatures made with it could be forged; remove it "
                        "(prunekit makes a new one; files it signed before are then re-done, not trusted)")


def _digest(path: str | Path, h: Any) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256: which base a result came from, and whether a stage's input is the same file."""
    return _digest(path, hashlib.sha256())


def file_signature(path: str | Path) -> str:
    """HMAC-SHA256 of the file's bytes under this machine's key."""
    return _digest(path, hmac.new(_signing_key(), digestmod=hashlib.sha256))


def signed_by_us(path: str | Path, signature: str | None) -> bool:
    """Whether ``path`` is byte for byte a file this machine's prunekit signed."""
    if not isinstance(signature, str) or not Path(path).is_file():
        return False
    return hmac.compare_digest(file_signature(path).encode(), signature.encode("utf-8", "surrogateescape"))


SIGNATURE = "prunekit_signature"


def _json_signature(value: dict) -> str:
    """HMAC of a mapping's canonical JSON (as read back: keys are strings after a round trip)."""
    body = json.dumps(json.loads(json.dumps(value)), sort_keys=True)
    return hmac.new(_signing_key(), body.encode(), hashlib.sha256).hexdigest()


def write_signed_json(value: dict, path: str | Path) -> None:
    """A measurement prunekit reads back as its own (a leaderboard's input), signed under this machine's key:
    a hand edit, however plausible, is then measured again rather than shown as measured."""
    atomic_write_text(json.dumps({**value, SIGNATURE: _json_signature(value)}, indent=1), path)


def read_json_mapping(path: str | Path) -> dict:
    """A cache or marker file's mapping; {} when it is missing, not JSON or not a mapping, so a damaged file
    is rebuilt or measured again rather than a traceback."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_signed_json(path: str | Path) -> dict:
    """What ``write_signed_json`` wrote; {} when the file is missing, damaged, unsigned or changed since."""
    value = read_json_mapping(path)
    signature = value.pop(SIGNATURE, None)
    if not isinstance(signature, str):
        return {}
    ok = hmac.compare_digest(_json_signature(value).encode(), signature.encode("utf-8", "surrogateescape"))
    return value if ok else {}
