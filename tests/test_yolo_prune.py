"""Ultralytics detectors pruned: every structured method, adaptive slimming, pruned equals masked, save/load in a
fresh process and ONNX, the detection task's mAP on labelled batches and auto-mend by mAP (sockets guarded, as in
``tests/yolo_helpers.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import pipeline
from prunekit.graph import PruneGraph

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)

from .yolo_helpers import X, base, net_attempts, offline, outputs, run_fresh, subset_yaml  # noqa: E402, F401  (net_attempts, offline: the socket guard, one per module)

STRUCTURED = ["l1-norm", "l2-norm", "fpgm", "net-slim", "random", "dist-fit"]


# Every method on the small yolov3-tinyu, l1-norm on yolov8n (10-35 s per prune here on 2 shared cores); yolo11n is
# pruned with l1-norm by the save/load test and channel-masked by test_pruned_equals_masked.
PRUNE_CASES = [("yolov3-tinyu", m) for m in STRUCTURED] + [("yolov8n", "l1-norm")]


# ---- pruning ----
def _shapes(ts: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in ts]


@pytest.mark.parametrize(("name", "method"), PRUNE_CASES)
def test_structured_methods_prune_detectors(name: str, method: str) -> None:
    model = base(name)
    before = outputs(model)
    protected = yolo.protected_layers(model)
    kept = [m.weight.detach().clone() for m in yolo.head_layers(model)]
    res = pk.prune(model, method, X, speedup=1.5, ignored_layers=protected)
    assert res.speedup == pytest.approx(1.5, rel=0.03)
    after = outputs(model)
    assert _shapes(after) == _shapes(before)
    for m, w in zip(yolo.head_layers(model), kept, strict=True):  # output channels untouched (inputs may shrink)
        assert m.out_channels == w.shape[0]


@pytest.mark.parametrize("name", ["yolov8n", "yolov3-tinyu"])  # with and without residual blocks
def test_adaptive_slim_removes_low_gamma_channels_and_blocks(name: str) -> None:
    model = base(name)
    before = outputs(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what sparsity training leaves: a population of negligible BN scale factors
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                u = torch.rand(m.num_features, generator=g)
                m.weight.copy_(torch.where(u < 0.3, 1e-3 * torch.rand(m.num_features, generator=g), 0.5 + u))
        blocks = [f"model.{i}.m.0" for i, m in enumerate(model.model) if type(m).__name__ == "SplitC2f"
                  and type(m.m[0]).__name__ == "Bottleneck" and m.m[0].add][:2]
        for b in blocks:  # two residual blocks whose branch sparsity training silenced
            model.get_submodule(b).cv2.bn.weight.mul_(1e-3)
    # max_valley=1: the block learner's density-valley check cannot see a valley in six block scores
    res = pk.prune(model, "adaptive-slim", X, ignored_layers=yolo.protected_layers(model), max_valley=1.0)
    assert res.speedup > 1.2
    assert sorted(res.blocks_removed) == blocks  # yolov3-tinyu has no residual block
    assert _shapes(outputs(model)) == _shapes(before)


def test_adaptive_slim_removes_darknet_residual_blocks_of_yolov3u() -> None:
    """S0's layer pruning on the paper's architecture: silenced Darknet-53 bottlenecks become identities."""
    model = base("yolov3u")
    before = outputs(model)
    blocks = ["model.2", "model.6.1", "model.8.2"]  # one per stage: a single block and inside Sequentials
    with torch.no_grad():
        for b in blocks:
            model.get_submodule(b).cv2.bn.weight.mul_(1e-3)
    res = pk.prune(model, "adaptive-slim", X, channels=False, max_valley=1.0)
    assert sorted(res.blocks_removed) == blocks and res.speedup > 1.02
    after = outputs(model)
    assert _shapes(after) == _shapes(before)
    assert all(type(model.get_submodule(b)).__name__ != "Bottleneck" for b in blocks)


@pytest.mark.parametrize("name", ["yolo11n", "yolov3-tinyu"])  # yolov8n's C2f is yolo11n's C3k2 rewrite
def test_pruned_equals_masked(name: str) -> None:
    masked, pruned = base(name), base(name)
    pg_masked = PruneGraph(masked, X, ignored_layers=yolo.protected_layers(masked))
    pg_pruned = PruneGraph(pruned, X, ignored_layers=yolo.protected_layers(pruned))
    remove = {g.index: list(range(0, g.size, 3)) for g in pg_masked.groups}
    pg_masked.zero_channels(remove)
    pg_pruned.apply(remove)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    for p, q in zip(outputs(masked), outputs(pruned), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)


def test_pruned_detector_saves_loads_in_fresh_process_and_exports(tmp_path: Path) -> None:
    model = base("yolo11n")
    pk.prune(model, "l1-norm", X, speedup=1.5, ignored_layers=yolo.protected_layers(model))
    pk.save(model, tmp_path / "pruned.pt")
    torch.save({"x": X, "out": outputs(model)}, tmp_path / "ref.pt")
    run_fresh("""
        import sys, torch
        import prunekit as pk
        assert "ultralytics" not in sys.modules  # the core never imports the AGPL extra on its own
        model = pk.load("pruned.pt")
        ref = torch.load("ref.pt")
        with torch.no_grad():
            out = model(ref["x"])
        flat = [out[0], out[1]["boxes"], out[1]["scores"]]
        assert len(flat) == len(ref["out"])
        for a, b in zip(flat, ref["out"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    """, tmp_path)
    # ONNX wants one output tensor: the decoded predictions. export_onnx's absolute 1e-4 check is too tight for
    # boxes in pixels (float32 noise reaches 1.2e-4 at |y| ~ 160), so the same export is checked relatively here.
    from prunekit.runtimes.ort import session, to_onnx

    with yolo.export_mode(model):
        to_onnx(model, X, tmp_path / "pruned.onnx", 17)
        ref = outputs(model)[0]
    got = torch.from_numpy(session(tmp_path / "pruned.onnx").run(None, {"input": X.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert isinstance(model(X), tuple)  # the flag is restored afterwards


# ---- the detection task: mAP on labelled batches, auto-mend on detectors ----
class _Oracle(nn.Module):
    """Predicts given boxes (letterboxed pixels, xywh) with class score 1: a detector whose mAP is known."""

    def __init__(self, boxes: list[torch.Tensor], nc: int, shift: float = 0.0):
        super().__init__()
        self.model = nn.ModuleList([nn.Identity()])
        self.model[-1].nc = nc
        self.boxes, self.nc, self.shift = boxes, nc, shift
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        out = torch.zeros(len(x), 4 + self.nc, 64)
        for i, lab in enumerate(self.boxes[: len(x)]):
            n = len(lab)
            out[i, :4, :n] = (lab[:, 2:] * size).T
            out[i, 0, :n] += self.shift * out[i, 2, :n]  # moved right by a fraction of its width
            out[i, 4 + lab[:, 1].long(), torch.arange(n)] = 1.0
        self.boxes = self.boxes[len(x):]
        return out


def test_detection_task_scores_labelled_batches_by_map(bccd) -> None:
    from prunekit.yolo.task import TASK, LabelledBatches

    batches = list(LabelledBatches(bccd, "val", imgsz=160, batch=4))[:2]
    labels = [lab[lab[:, 0] == i] for _, lab in batches for i in range(4)]
    assert all(((lab[:, 2:4] > 0) & (lab[:, 2:4] < 1)).all() for lab in labels)
    perfect = TASK.evaluate(_Oracle(labels, len(bccd.names)), batches, torch.device("cpu"))
    assert perfect["mAP50"] > 99 and perfect["mAP50-95"] > 99  # 99.5: COCO interpolation's ceiling
    moved = TASK.evaluate(_Oracle(labels, len(bccd.names), shift=0.3), batches, torch.device("cpu"))
    assert moved["mAP50-95"] < 60  # IoU ~0.54 per box: found at 0.5, missed above


@pytest.mark.parametrize("name", ["yolov3-tinyu", "yolov8n"])
def test_auto_mend_prunes_a_detector_by_map(name: str, bccd, tmp_path: Path) -> None:
    """Through pk.prune with letterboxed calibration and labelled val batches, and (tinyu) through the pipeline."""
    from prunekit.yolo.data import image_batches
    from prunekit.yolo.task import LabelledBatches

    model = base(name)
    calib = image_batches(bccd, "train", imgsz=160, batch=4, limit=8)
    val = LabelledBatches(bccd, "val", imgsz=160, batch=4)
    res = pk.prune(model, "auto-mend", speedup=1.5, data=calib, val=list(val)[:2], candidates=3,
                   calibration_batches=1, val_batches=2, ignored_layers=yolo.protected_layers(model))
    assert res.speedup == pytest.approx(1.5, rel=0.03)
    assert res.info["metric"] == "mAP50-95" and len(res.info["candidates"]) == 3
    if name != "yolov3-tinyu":
        return
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "out": str(tmp_path / "run"),
           "data": {"name": str(data), "image_size": 160, "batch_size": 4, "calibration_batches": 1},
           "method": {"name": "auto-mend", "params": {"candidates": 2, "calibration_batches": 1, "val_batches": 1}},
           "target": {"speedup": 1.5}, "stages": [{"stage": "prune"}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)
