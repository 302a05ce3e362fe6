"""Ultralytics detectors trained: the pruned model kept, resume from the next epoch, signed checkpoints (a kill
between write and signature, a planted checkpoint, links in a run folder), run folders of their own, head
distillation (sockets guarded, as in ``tests/yolo_helpers.py``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import pipeline
from prunekit.errors import PrunekitError

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)

from .yolo_helpers import X, base, net_attempts, offline, outputs, record_starts, subset_yaml  # noqa: E402, F401  (net_attempts, offline: the socket guard, one per module)


# ---- training ----
def test_training_keeps_the_pruned_model(bccd, tmp_path: Path) -> None:
    subset_yaml(bccd, tmp_path, {"train": 16, "val": 8})
    model = base("yolov8n")
    pk.prune(model, "l1-norm", X, speedup=1.5, ignored_layers=yolo.protected_layers(model))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    class Recorder:
        """A regulariser stand-in: records the rate it is called with."""

        s, calls = 1e-3, []

        def __call__(self, m: nn.Module) -> None:
            self.calls.append(self.s)

    hook = Recorder()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not what Ultralytics' select_device sets (min(8, cores - 1)) on any machine here
    try:
        metrics = yolo.train(model, tmp_path / "data.yaml", epochs=1, imgsz=160, batch=8, workers=0,
                             project=tmp_path / "runs", seed=0, after_backward=hook)
        assert torch.get_num_threads() == 3  # the caller's thread count is back after its trainer and validator
    finally:
        torch.set_num_threads(threads)
    # 2 batches of 8 accumulate into one step (nbs 64, capped at the run's batches): the rate is per mean loss,
    # so it is scaled by the 16 images that Ultralytics' summed loss covers
    assert hook.calls == [pytest.approx(1e-3 * 16)]
    assert hook.s == 1e-3
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes  # not rebuilt from the yaml
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    assert 0.0 <= metrics["metrics/mAP50(B)"] <= 1.0 and 0.0 <= metrics["metrics/mAP50-95(B)"] <= 1.0
    assert all(torch.isfinite(t).all() for t in outputs(model))
    with pytest.raises(PrunekitError, match="predicts 5 classes but .* has 3"):
        yolo.train(pk.models.create("ul:yolov3-tinyu", num_classes=5), tmp_path / "data.yaml")


def test_interrupted_training_resumes_from_its_next_epoch(bccd, tmp_path: Path, monkeypatch) -> None:
    """A run killed after epoch 1 of 2 continues at epoch 2 with the model it trained, not a rebuilt one."""
    yolo.ultralytics()  # offline before this test's own import from Ultralytics
    from ultralytics.models.yolo.detect import DetectionTrainer

    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    model = base("yolov3-tinyu")
    pk.prune(model, "l1-norm", X, speedup=1.5)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    run = {"epochs": 2, "imgsz": 160, "batch": 8, "workers": 0, "project": tmp_path / "runs", "name": "r", "seed": 0,
           "plots": False}
    callbacks = DetectionTrainer.run_callbacks

    def die_after_save(self, event):  # the kill comes right after epoch 1's checkpoint is written (and signed)
        callbacks(self, event)
        if event == "on_model_save":
            raise KeyboardInterrupt

    monkeypatch.setattr(DetectionTrainer, "run_callbacks", die_after_save)
    with pytest.raises(KeyboardInterrupt):
        yolo.train(model, tmp_path / "data.yaml", **run)
    monkeypatch.setattr(DetectionTrainer, "run_callbacks", callbacks)
    starts = record_starts(monkeypatch)
    resumed = base("yolov3-tinyu")  # the same pruned architecture, as the pipeline reloads it from its file
    pk.prune(resumed, "l1-norm", X, speedup=1.5)
    yolo.train(resumed, tmp_path / "data.yaml", resume=True, **run)
    assert starts == [1]  # epoch index 1: the second of two
    assert {k: tuple(v.shape) for k, v in resumed.state_dict().items()} == shapes


def test_a_kill_between_ultralytics_write_and_signature_loses_only_that_epoch(bccd, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """Killed after Ultralytics wrote epoch 2's last.pt but before prunekit signed it: the run resumes at epoch 2
    from epoch 1's signed checkpoint, with no "not written on this machine" restart."""
    yolo.ultralytics()
    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    run = {"epochs": 3, "imgsz": 64, "batch": 8, "workers": 0, "project": tmp_path / "runs", "name": "r", "seed": 0,
           "plots": False}
    write, lasts = Path.write_bytes, []

    def die_after_second_last(self, data):  # the kill lands right after the bytes of epoch 2's last.pt
        out = write(self, data)
        if "last" in self.name:
            lasts.append(self.name)
            if len(lasts) == 2:
                raise KeyboardInterrupt
        return out

    model = base("yolov3-tinyu")
    monkeypatch.setattr(Path, "write_bytes", die_after_second_last)
    with pytest.raises(KeyboardInterrupt):
        yolo.train(model, tmp_path / "data.yaml", **run)
    monkeypatch.setattr(Path, "write_bytes", write)
    starts = record_starts(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "not written by prunekit" restart
        yolo.train(base("yolov3-tinyu"), tmp_path / "data.yaml", resume=True, **run)
    assert starts == [1]
    weights = tmp_path / "runs" / "r" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]  # no pending file left behind
    assert yolo._signed(weights / "last.pt", weights.parent / "prunekit-signatures.json")


def test_a_planted_checkpoint_is_never_unpickled(bccd, tmp_path: Path) -> None:
    """A run folder from elsewhere: its last.pt carries no signature of this machine, so it is not opened."""
    import pickle

    class Plant:
        def __reduce__(self):
            return (open, (str(tmp_path / "MARKER"), "w"))

    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    weights = tmp_path / "runs" / "r" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").write_bytes(pickle.dumps(Plant()))
    (tmp_path / "runs" / "r" / "prunekit-signatures.json").write_text('{"last.pt": "forged"}')
    model = base("yolov3-tinyu")
    with pytest.warns(UserWarning, match="not written by prunekit on this machine"):
        yolo.train(model, tmp_path / "data.yaml", epochs=1, imgsz=64, batch=8, workers=0, project=tmp_path / "runs",
                   name="r", plots=False, resume=True)
    assert not (tmp_path / "MARKER").exists()


def test_two_detector_runs_with_one_relative_out_keep_their_own_files(bccd, tmp_path: Path, monkeypatch) -> None:
    """Each run's Ultralytics folder lives under its own out, whatever out looks like."""
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    fast = {"workers": 0, "plots": False}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1}, "out": "run",
           "stages": [{"stage": "train", "epochs": 1, "ultralytics": fast}]}
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        pipeline.run(cfg)
    for where in ("a", "b"):
        weights = tmp_path / where / "run" / "stages" / "01-train" / "ultralytics" / "weights"
        assert (weights / "last.pt").is_file() and (weights.parent / "prunekit-signatures.json").is_file()


def test_killed_detector_stage_with_a_relative_out_resumes_from_its_epoch(bccd, tmp_path: Path) -> None:
    """kill -9 during epoch 2 of 3 of a run whose out is relative; the re-run continues at epoch 2."""
    import signal
    import time

    import yaml

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1}, "out": "run",
           "stages": [{"stage": "train", "epochs": 3, "ultralytics": {"workers": 0, "plots": False}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    signed = tmp_path / "run" / "stages" / "01-train" / "ultralytics" / "prunekit-signatures.json"
    cmd = [sys.executable, "-m", "prunekit", "run", "cfg.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not signed.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert signed.exists(), "epoch 1 never finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming training" in again.stdout + again.stderr and "from epoch 1 " not in again.stdout + again.stderr


def test_head_distillation_is_zero_for_the_teacher_itself_and_pulls_otherwise() -> None:
    from prunekit.yolo.distill import head_kd

    g = torch.Generator().manual_seed(0)
    t = {"scores": torch.randn(2, 3, 50, generator=g), "boxes": torch.randn(2, 64, 50, generator=g)}
    s = {"scores": t["scores"].clone().requires_grad_(True), "boxes": t["boxes"].clone().requires_grad_(True)}
    same = head_kd(s, t, 2.0)
    bce_floor = torch.nn.functional.binary_cross_entropy_with_logits(
        t["scores"], torch.sigmoid(t["scores"]), reduction="none").sum(1)
    w = torch.sigmoid(t["scores"]).amax(1)
    assert same.item() == pytest.approx(float((bce_floor * w).sum() / w.sum()), rel=1e-5)  # the KL part is 0
    moved = {"scores": s["scores"] + 1.0, "boxes": s["boxes"] * 0.5}
    loss = head_kd(moved, t, 2.0)
    assert loss > same
    loss.backward()
    assert s["scores"].grad.abs().sum() > 0 and s["boxes"].grad.abs().sum() > 0
    with pytest.raises(PrunekitError, match="same classes, strides and image size"):
        head_kd({"scores": torch.zeros(2, 3, 40), "boxes": torch.zeros(2, 64, 40)}, t, 2.0)


def test_a_distilled_detector_finetune_keeps_the_pruned_model(bccd, tmp_path: Path) -> None:
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    fast = {"workers": 0, "plots": False}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"},
                      {"stage": "finetune", "epochs": 1, "ultralytics": fast,
                       "distill": {"teacher": "before", "alpha": 1.0, "temperature": 2.0}}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)
    pruned = pk.load(metrics["models"]["after"])
    assert getattr(pruned, "criterion", None) is None  # the teacher never rides along
    other = tmp_path / "other.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=5, imgsz=64), other)
    bad = {**cfg, "out": str(tmp_path / "run2")}
    bad["stages"] = [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast,
                                          "distill": {"teacher": str(other)}}]
    with pytest.raises(PrunekitError, match=r"finetune\.distill\.teacher predicts"):
        pipeline.run(bad)


def test_a_detector_run_folder_is_its_own_and_links_in_it_are_never_written_through(bccd, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    yolo.ultralytics()  # prunekit's offline set-up first: importing Ultralytics itself checks connectivity
    from ultralytics.engine import trainer as ul_trainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    seen, original = {}, ul_trainer.check_amp
    monkeypatch.setattr(DetectionTrainer, "train", lambda self: seen.update(save_dir=self.save_dir,
                                                                            amp=ul_trainer.check_amp))
    model = base("yolov8n")
    yolo.train(model, bccd.yaml, epochs=1, imgsz=160, project=tmp_path / "copy", name="ultralytics")
    assert seen["save_dir"] == (tmp_path / "copy" / "ultralytics").resolve()  # never the folder a checkpoint names
    assert seen["amp"] is not original and ul_trainer.check_amp is original  # patched for the training only
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"precious")
    weights = tmp_path / "linked" / "ultralytics" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").symlink_to(victim)
    with pytest.raises(PrunekitError, match="last.pt is a symbolic link: prunekit never writes through a link"):
        yolo.train(model, bccd.yaml, epochs=1, imgsz=160, project=tmp_path / "linked", name="ultralytics",
                   resume=True)
    assert victim.read_bytes() == b"precious"
