"""Export: ONNX (checked, compared with ONNX Runtime) and the sparse file, through the CLI."""

from __future__ import annotations

import json

import onnx
import torch

import prunekit as pk

from .conftest import run_cli


def test_pruned_model_exports_to_onnx_and_eval_reports_speedups(tmp_path):
    torch.manual_seed(0)
    base = pk.models.create("resnet20").eval()
    base.prunekit_arch["input_shape"] = [3, 32, 32]
    pk.save(base, tmp_path / "base.pt")
    r = run_cli("prune", "--checkpoint", str(tmp_path / "base.pt"), "--method", "l1-norm", "--speedup", "2",
                "--out", str(tmp_path / "pruned.pt"))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "--checkpoint", str(tmp_path / "pruned.pt"), "--format", "onnx", "--out",
                str(tmp_path / "pruned.onnx"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["opset"] >= 17 and info["max_abs_diff"] < 1e-4
    graph = onnx.load(str(tmp_path / "pruned.onnx"))
    onnx.checker.check_model(graph)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs, "the exported graph holds the pruned convolutions"
    r = run_cli("eval", "--checkpoint", str(tmp_path / "pruned.pt"), "--base", str(tmp_path / "base.pt"), "--onnx",
                "--json", "--repeats", "3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1.94 <= payload["theoretical_speedup"] <= 2.06
    assert set(payload["measured_speedup"]) == {"b1", "b64"} and set(payload["onnx_measured_speedup"]) == {"b1", "b64"}
    assert payload["onnx_latency"]["b1"]["median_ms"] > 0


def test_sparse_export_through_cli_round_trips(tmp_path):
    torch.manual_seed(0)
    model = pk.models.create("resnet20").eval()
    pk.prune(model, "magnitude", torch.randn(1, 3, 32, 32), sparsity=0.9)
    pk.save(model, tmp_path / "sparse.pt")
    r = run_cli("export", "--checkpoint", str(tmp_path / "sparse.pt"), "--format", "sparse", "--values", "fp32",
                "--out", str(tmp_path / "m.spk"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["sparse_bytes"] < 0.35 * info["dense_bytes"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path / "m.spk")(x), model(x))
