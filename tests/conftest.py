"""Shared fixtures: the real data beside the project, and a way to run the CLI as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED / "cifar10" / "cifar10-jpeg.tar.gz"
BCCD = SHARED / "bccd"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run ``python -m prunekit ARGS`` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "prunekit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {CIFAR_ARCHIVE}")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-image cache for the whole session, so CIFAR-10 is decoded once."""
    return tmp_path_factory.mktemp("pk-cache")


@pytest.fixture(scope="module")
def bccd(tmp_path_factory):
    """The shared BCCD copy converted to the YOLO layout, once per test module."""
    from prunekit.yolo.data import voc_to_yolo

    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    with pytest.warns(UserWarning, match="bccd: .*boxes") as record:
        data = voc_to_yolo(BCCD, cache_dir=tmp_path_factory.mktemp("bccd"))
    assert len(record) == 1
    return data


# The fast lane (`pytest -m "not slow"`, for development) leaves out whatever starts a fresh interpreter, trains
# through a pipeline, a compare, the demo or Ultralytics, reads the real data sets, or traces one of the large
# torchvision models (HEAVY: seconds each); CI and the README run everything.
SLOW_MODULES = {"test_yolo", "test_yolo_prune", "test_yolo_train", "test_yolo_pipeline", "test_yolo_tools",
                "test_yolo_layouts", "test_compare", "test_budgets", "test_distill"}
SLOW_SIGNS = ("run_cli(", "subprocess", "sys.executable", "cifar_archive", "SHARED", "pipeline.run(", "compare.run(",
              "yolo.train(", "torchrun", "_fresh_process", "run_demo(", "from prunekit import yolo")
SLOW_FIXTURES = {"cifar_archive", "cifar", "board", "bccd", "trained", "yolo_data"}
HEAVY = ("tv:swin_t", "tv:convnext_tiny", "tv:regnet_x_400mf", "densenet121")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        if (module in SLOW_MODULES or any(s in source for s in SLOW_SIGNS)
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(f"[{h}]" in item.name for h in HEAVY)):
            item.add_marker(pytest.mark.slow)
