"""int8 deployment: ONNX Runtime static quantisation as a runtime, an export and a compare column, each
metric measured by running the int8 file itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit import compare, latency, pipeline, runtimes
from prunekit.errors import PrunekitError
from prunekit.export import export_int8, int8_path
from prunekit.runtimes.ort import OnnxModule, session
from prunekit.timing import side_by_side

from .conftest import run_cli
from .test_compare import SMALL


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """digits_cnn trained for a few epochs on the embedded digits (int8 of an untrained net says nothing)."""
    out = tmp_path_factory.mktemp("int8")
    pipeline.run({"name": "b", "model": {"name": "digits_cnn"}, "data": {"name": "digits", "batch_size": 64},
                     "out": str(out / "base"), "stages": [{"stage": "train", "epochs": 4, "lr": 0.1}]})
    return out / "base" / "stages" / "01-train" / "model.pt"


def test_int8_export_writes_both_files_and_measures_the_int8_file_on_the_test_split(trained, tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--checkpoint", str(trained), "--int8", "--data", "digits", "--calibration-batches", "4",
                "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.exists() and int8_path(out).exists() and info["int8"]["calibration_batches"] == 4
    assert info["int8"]["bytes"] < 0.5 * info["bytes"]  # int8 weights: a quarter of fp32, plus scales
    m = info["metrics"]
    assert m["fp32_onnx"]["top1"] == pytest.approx(m["pytorch"]["top1"], abs=0.01)  # the same model, exported
    assert abs(m["int8"]["top1"] - m["fp32_onnx"]["top1"]) < 3.0 and m["int8"]["top1"] > 80
    assert set(info["speedup_int8_vs_fp32"]) == {"1", "64"}
    model = pk.load(trained)
    x = next(iter(pk.data.load("digits").eval_loader(pk.data.load("digits").test, 64)))[0]
    with torch.no_grad():
        ref = model.eval()(x)
    got = OnnxModule(int8_path(out), model)(x)
    assert got.shape == ref.shape and not torch.equal(got, ref)  # run by the int8 graph, not the fp32 model
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("args, message", [
    (["--int8"], "give --data"),
    (["--int8", "--data", "digits", "--format", "sparse"], "use --format onnx"),
    (["--data", "digits"], "add --int8"),
    (["--int8", "--data", "digits", "--calibration-batches", "0"], "calibration-batches"),
])
def test_bad_int8_export_input_is_one_line_and_writes_nothing(trained, tmp_path, args, message):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--checkpoint", str(trained), *args, "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_quantisation_leaves_no_partial_file_and_the_fp32_export_intact(trained, tmp_path, monkeypatch):
    import onnxruntime.quantization as q

    def broken(*a, **k):
        Path(a[1]).write_bytes(b"half")  # a quantiser dying after it started writing
        raise RuntimeError("Unsupported node /conv/Conv")

    monkeypatch.setattr(q, "quantize_static", broken)
    model = pk.load(trained)
    with pytest.raises(PrunekitError, match="int8 quantisation of m.onnx failed .*Unsupported node /conv/Conv"):
        export_int8(model, [torch.rand(8, 1, 8, 8)], tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # fp32 kept, no int8 and no temporary
    session(tmp_path / "m.onnx")  # and it loads


def test_int8_is_a_runtime_timed_against_the_fp32_base_in_the_same_rounds():
    torch.manual_seed(0)
    big = pk.models.create("digits_cnn", in_channels=1)
    small = copy.deepcopy(big)
    pk.prune(small, "l1-norm", torch.randn(2, 1, 8, 8), speedup=2.0)
    assert "onnxruntime-int8" in runtimes.names()
    res = side_by_side({"base": big, "pruned": small}, torch.randn(1, 1, 8, 8), batch_sizes=(4,),
                       runtimes=("onnxruntime", "onnxruntime-int8"), threads=1, rounds=3, across=True)
    assert set(res["b4"]) == {"base/ort", "pruned/ort", "base/ort-int8", "pruned/ort-int8"}
    assert res["b4"]["base/ort"]["ratio"]["median"] == 1.0 and res["b4"]["pruned/ort-int8"]["median_ms"] > 0
    with pytest.raises(PrunekitError, match="unknown runtime 'tensorrt'; allowed: eager, onnxruntime, onnxrunt"):
        side_by_side({"base": big}, torch.randn(1, 1, 8, 8), runtimes=("tensorrt",))


def test_a_latency_target_can_be_timed_on_int8():
    model = pk.models.create("digits_cnn", in_channels=1)
    with pytest.raises(PrunekitError, match="latency must be a finite number > 1"):  # checked before any work
        pk.prune(model, "l1-norm", torch.randn(2, 1, 8, 8), latency=0.5, runtime="onnxruntime-int8")
    latency.check_setting("onnxruntime-int8", 1, 1)


def test_compare_int8_adds_the_int8_metric_per_row_and_the_base_quantised_alone(tmp_path):
    cfg = {**copy.deepcopy(SMALL), "methods": ["l1-norm"], "seeds": [0], "int8": {"calibration_batches": 2},
           "latency": {"batch": 8, "threads": 1, "rounds": 3, "runtimes": ["onnxruntime"]}}
    board = compare.run(cfg, out=tmp_path / "out")
    (row,) = board["rows"]
    assert row["int8_metric_mean"] is not None and abs(row["int8_metric_mean"] - row["metric_mean"]) < 5
    assert {"ort_b8", "ort-int8_b8", "ort-int8_b1"} <= set(row["latency"])
    assert board["base_int8"]["top1"] > 50 and set(board["base_int8"]["latency"]) == {"ort-int8_b1", "ort-int8_b8"}
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "int8 mean ± std" in md and "The base quantised alone" in md
    cache = json.loads((tmp_path / "out" / "int8.json").read_text())
    assert set(cache["results"]) == {"base", "l1-norm-2x-s0"}
    before = (tmp_path / "out" / "int8.json").stat().st_mtime_ns
    compare.run(cfg, out=tmp_path / "out")  # nothing changed: nothing quantised again
    assert (tmp_path / "out" / "int8.json").stat().st_mtime_ns == before
    true = cache["results"]["l1-norm-2x-s0"]["top1"]
    cache["results"]["l1-norm-2x-s0"]["top1"] = 99.9  # a plausible hand edit, the hashes left intact
    (tmp_path / "out" / "int8.json").write_text(json.dumps(cache))
    again = compare.run(cfg, out=tmp_path / "out")
    assert again["rows"][0]["int8_metric_mean"] == pytest.approx(true, abs=0.01)  # measured again, not the edit


@pytest.mark.parametrize("int8, message", [
    ({"calibration_batches": 0}, "int8.calibration_batches"),
    ({"method": "magic"}, "int8.method"),
    ({"batches": 3}, "int8"),
])
def test_bad_compare_int8_settings_fail_before_any_cell(tmp_path, int8, message):
    with pytest.raises(PrunekitError, match=message):
        compare.validate({**copy.deepcopy(SMALL), "out": str(tmp_path / "o"), "int8": int8})
    assert not (tmp_path / "o").exists()


def test_a_detector_int8_keeps_its_box_decoding_float_and_its_onnx_map_equals_pytorch(tmp_path):
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:  # not imported here: prunekit sets it up offline first
        pytest.skip("ultralytics (the yolo extra) is not installed")
    from prunekit import yolo
    from prunekit.yolo import data as ydata
    from prunekit.yolo import validate

    from .conftest import BCCD
    from .yolo_helpers import base

    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    yolo.ultralytics()
    model = base("yolov8n")
    det = ydata.detection_data(BCCD, cache_dir=tmp_path / "cache")
    calib = [b[0] for b in ydata.image_batches(det, "train", imgsz=320, batch=4, seed=0, limit=8)]
    info = export_int8(model, calib, tmp_path / "d.onnx")
    import onnx

    graph = onnx.load(str(int8_path(tmp_path / "d.onnx"))).graph
    quantised = {n.name for n in graph.node if n.op_type == "QuantizeLinear"}
    assert info["int8"]["float_nodes"] > 0 and "boxes in pixels" in info["int8"]["float_why"][0]
    assert any("/model.22/cv" in q for q in quantised)  # the head's convolutions are int8 ...
    assert not [q for q in quantised if "/model.22/" in q and "/model.22/cv" not in q]  # ... its decoding is not
    threads = torch.get_num_threads()
    torch_maps = validate(model, det.yaml, split="val", imgsz=320)
    assert torch.get_num_threads() == threads  # Ultralytics' validator set it process-wide; prunekit puts it back
    onnx_maps = validate(OnnxModule(tmp_path / "d.onnx", model), det.yaml, split="val", imgsz=320)
    assert onnx_maps == pytest.approx(torch_maps, abs=1e-4)  # same boxes, same NMS, same metric code


def test_a_pipeline_export_stage_adds_the_int8_column_measured_on_the_int8_files(tmp_path):
    cfg = {"name": "q", "model": {"name": "digits_cnn"}, "data": {"name": "digits", "batch_size": 64},
           "method": {"name": "l1-norm"}, "target": {"speedup": 2.0}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "train", "epochs": 3, "lr": 0.1}, {"stage": "prune"},
                      {"stage": "finetune", "epochs": 1, "lr": 0.05},
                      {"stage": "export", "int8": True, "calibration_batches": 2}]}
    metrics = pipeline.run(cfg)
    after, before = metrics["after"], metrics["before"]
    assert {"int8_top1", "int8_size_bytes", "int8_speedup_b1", "int8_speedup_b64", "ort_speedup_b1"} <= set(after)
    assert before["int8_speedup_b1"]["median"] > 0 and abs(after["int8_top1"] - after["top1"]) < 5
    assert after["int8_size_bytes"] < before["int8_size_bytes"]  # pruned, then quantised
    assert (tmp_path / "run" / "export" / "model.int8.onnx").exists()
    assert "int8 test top-1" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("stages, message", [
    ([{"stage": "export", "int8": True}, {"stage": "train", "epochs": 1}], "it is the last stage"),
    ([{"stage": "export", "calibration_batches": 4}], "add int8: true"),
    ([{"stage": "export", "int8": True, "calibration_batches": 0}], "calibration_batches"),
    ([{"stage": "export", "int8": "yes"}], "int8"),
])
def test_bad_export_stages_fail_before_any_stage(tmp_path, stages, message):
    cfg = {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": str(tmp_path / "run"),
           "stages": stages}
    with pytest.raises(PrunekitError, match=message):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_compare_without_int8_keeps_the_config_older_compare_folders_were_written_with(tmp_path):
    for off in ({}, {"int8": False}):
        cfg = compare.validate({**copy.deepcopy(SMALL), "out": str(tmp_path / "o"), **off})
        assert "int8" not in cfg and compare.validate(cfg) == cfg  # a resumed folder's compare.yaml still matches
