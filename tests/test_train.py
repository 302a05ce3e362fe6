"""Training engine: learning works, checkpoints are atomic, a killed run resumes, DDP with gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import prunekit as pk
from prunekit import io
from prunekit.errors import PrunekitError
from prunekit.train import TrainConfig, evaluate, fit

from .conftest import run_cli


def _digits_setup(seed: int = 0):
    bundle = pk.data.load("digits")
    model = pk.models.create("digits_cnn", num_classes=10, in_channels=1)
    tr, te = bundle.loaders(batch_size=64, seed=seed)
    return bundle, model, tr, te


def test_training_learns_digits(tmp_path):
    _, model, tr, te = _digits_setup()
    before = evaluate(model, te)["top1"]
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=64, label_smoothing=0.0)
    model, res = fit(model, tr, te, cfg, device="cpu", run_dir=tmp_path)
    assert res.final["val_top1"] > 85.0 > before
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["format"] == "prunekit-train"


def test_hooks_are_called(tmp_path):
    _, model, tr, te = _digits_setup()
    calls = {"loss": 0, "backward": 0, "step": 0}

    def extra(m, out, y):
        calls["loss"] += 1
        return 0.0 * out.sum()

    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64)
    fit(model, tr, None, cfg, device="cpu", extra_loss=extra,
        after_backward=lambda m: calls.__setitem__("backward", calls["backward"] + 1),
        after_step=lambda m: calls.__setitem__("step", calls["step"] + 1))
    assert calls["loss"] == calls["backward"] == calls["step"] == len(tr)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    io.atomic_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(PrunekitError, match="No space left"):
        io.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_invalid_config_is_named():
    with pytest.raises(PrunekitError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(PrunekitError, match="unknown training setting"):
        TrainConfig.from_dict({"epochz": 3})


def test_resume_after_kill_loses_at_most_one_epoch(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    args = ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "5", "--lr", "0.1",
            "--batch-size", "32", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through epoch 3
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 2 <= done < 5, "the run should have been killed part-way"
    r = run_cli(*args, "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]
    r = run_cli(*args, "--out", str(whole))
    assert r.returncode == 0, r.stderr
    a, b = pk.load(killed / "model.pt"), pk.load(whole / "model.pt")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(va.float(), vb.float(), atol=1e-4), f"{ka} differs after resume"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "prunekit", "train", "--model", "digits_cnn", "--data",
           "digits", "--epochs", "2", "--lr", "0.1", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["world_size"] for x in recs] == [2, 2]
    assert recs[-1]["val_top1"] > 70
    assert (out / "model.pt").exists()
