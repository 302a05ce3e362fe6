"""Shared by the Ultralytics detector tests (test_yolo*.py): the socket guard, fresh-process runs, the randomised
base detectors and a subset of the BCCD data (the ``bccd`` fixture is in ``conftest.py``). A test module
imports the fixtures ``net_attempts`` and ``offline`` from here, so each module gets its own socket guard.

Every test runs with sockets guarded: a connection (or DNS lookup) to anything but loopback is
recorded and fails the test, here and in the fresh processes the tests start.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import yolo  # does not import ultralytics by itself

X = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))


# Installed in this process by the `offline` fixture and prepended to every script run in a fresh process.
GUARD = textwrap.dedent("""
    import socket
    NET_ATTEMPTS = []
    _LOCAL = {None, "localhost", "127.0.0.1", "::1", "0.0.0.0"}
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def _allowed(sock, address):
        return sock.family == getattr(socket, "AF_UNIX", None) or (isinstance(address, tuple) and address[0] in _LOCAL)

    def _guard_connect(sock, address):
        if not _allowed(sock, address):
            NET_ATTEMPTS.append(("connect", address))
            raise OSError(f"test guard: network access to {address!r}")
        return _connect(sock, address)

    def _guard_connect_ex(sock, address):
        if not _allowed(sock, address):
            NET_ATTEMPTS.append(("connect_ex", address))
            raise OSError(f"test guard: network access to {address!r}")
        return _connect_ex(sock, address)

    def _guard_getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            NET_ATTEMPTS.append(("getaddrinfo", host))
            raise OSError(f"test guard: DNS lookup of {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = _guard_connect, _guard_connect_ex
    socket.getaddrinfo = _guard_getaddrinfo
""")


@pytest.fixture(scope="module")
def net_attempts(tmp_path_factory):
    """Guard sockets for the whole module (before Ultralytics is first imported); restored afterwards."""
    import socket

    saved = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    env = os.environ.get("PRUNEKIT_CACHE")
    os.environ["PRUNEKIT_CACHE"] = str(tmp_path_factory.mktemp("pk-yolo-cache"))  # fresh settings, no old fonts
    scope: dict = {}
    exec(GUARD, scope)
    yield scope["NET_ATTEMPTS"]
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved
    if env is None:
        os.environ.pop("PRUNEKIT_CACHE", None)
    else:
        os.environ["PRUNEKIT_CACHE"] = env


@pytest.fixture(autouse=True)
def offline(net_attempts):
    yield
    assert net_attempts == [], f"network access attempted: {net_attempts}"


def run_fresh(script: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter behind the socket guard; it fails if anything tried the network."""
    check = "\nassert NET_ATTEMPTS == [], NET_ATTEMPTS\nprint('NET-OK')\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(script) + check], capture_output=True,
                          text=True, cwd=tmp_path, timeout=timeout, env=env)
    assert proc.returncode == 0 and "NET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def outputs(model: nn.Module, x: torch.Tensor = X) -> list[torch.Tensor]:
    """The detector's results (not the neck feature maps Ultralytics also returns, which pruning may narrow)."""
    model.eval()
    with torch.no_grad():
        return yolo.predictions(model(x))


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from their defaults, so exactness tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model


_BASES: dict[str, nn.Module] = {}


def base(name: str) -> nn.Module:
    """One randomised ``ul:<name>`` per session (building costs seconds); tests prune deep copies."""
    if name not in _BASES:
        torch.manual_seed(0)
        _BASES[name] = randomise_bn(pk.models.create(f"ul:{name}", num_classes=3, imgsz=320)).eval()
    return copy.deepcopy(_BASES[name])


def subset_yaml(bccd, tmp_path: Path, sizes: dict[str, int]) -> Path:
    """A YOLO data yaml over the first images of each BCCD split (txt lists, as Ultralytics reads them)."""
    import yaml

    root, entries = bccd.yaml.parent, {}
    for split, n in sizes.items():
        images = sorted((root / "images" / split).iterdir())[:n]
        (tmp_path / f"{split}.txt").write_text("".join(f"{p}\n" for p in images))
        entries[split] = str(tmp_path / f"{split}.txt")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**entries, "names": dict(enumerate(bccd.names))}))
    return tmp_path / "data.yaml"


def record_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The epoch each Ultralytics training loop started at (``start_epoch``, set by resume_training inside the
    loop's set-up), appended as each ``DetectionTrainer._do_train`` call returns."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    starts, train_loop = [], DetectionTrainer._do_train

    def record_start(self):
        out = train_loop(self)
        starts.append(self.start_epoch)
        return out

    monkeypatch.setattr(DetectionTrainer, "_do_train", record_start)
    return starts
