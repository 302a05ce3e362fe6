"""Importing Ultralytics without network access: ``ultralytics()`` switches off everything in it that reaches
the network (connectivity probe, analytics events, pip auto-install, font download, logger integrations) and keeps
its settings, fonts and runs in a prunekit-controlled directory; every Ultralytics import in ``prunekit.yolo``
comes after a call to it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from ..errors import PrunekitError

_module: ModuleType | None = None


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


@contextmanager
def threads_kept() -> Iterator[None]:
    """The caller's torch thread count back after an Ultralytics trainer or validator: its ``select_device``
    sets it process-wide to ``min(8, cores - 1)`` (1 on two cores) and never restores it."""
    import torch

    old = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
