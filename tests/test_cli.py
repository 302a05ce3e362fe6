"""Bad input gives one clear error line and exit code 2, and never overwrites results."""

from __future__ import annotations

import pytest
import torch

import prunekit as pk

from .conftest import run_cli


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.pt"
    model = pk.models.create("digits_cnn", num_classes=10, in_channels=1)
    pk.save(model, path)
    return path


def test_unknown_model(tmp_path):
    _one_line_error(run_cli("train", "--model", "resnet21", "--data", "digits", "--out", str(tmp_path / "o")),
                    "unknown model", "resnet20")


def test_missing_data_dir(tmp_path):
    _one_line_error(run_cli("train", "--model", "resnet20", "--data", str(tmp_path / "nope"), "--out",
                            str(tmp_path / "o")), "nope")


def test_cuda_requested_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(run_cli("train", "--model", "digits_cnn", "--data", "digits", "--device", "cuda",
                            "--out", str(tmp_path / "o")), "CUDA is not available")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint(tmp_path, saved_model, damage):
    bad = tmp_path / f"{damage}.pt"
    raw = saved_model.read_bytes()
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.ones(2)}, bad)
    _one_line_error(run_cli("eval", "--checkpoint", str(bad)), str(bad))


def test_newer_format_is_refused(tmp_path, saved_model):
    obj = torch.load(saved_model, weights_only=True)
    obj["version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(obj, newer)
    _one_line_error(run_cli("eval", "--checkpoint", str(newer)), "newer prunekit")


def test_never_overwrites(tmp_path, saved_model):
    out = tmp_path / "pruned.pt"
    out.write_bytes(b"precious")
    _one_line_error(run_cli("prune", "--checkpoint", str(saved_model), "--method", "l1-norm", "--speedup", "2",
                            "--out", str(out)), "already exists")
    assert out.read_bytes() == b"precious"


def test_unknown_method(tmp_path, saved_model):
    _one_line_error(run_cli("prune", "--checkpoint", str(saved_model), "--method", "magic", "--speedup", "2",
                            "--out", str(tmp_path / "p.pt")), "unknown method", "l1-norm")


def test_eval_json_and_methods(saved_model):
    r = run_cli("eval", "--checkpoint", str(saved_model), "--data", "digits", "--json", "--repeats", "3")
    assert r.returncode == 0, r.stderr
    import json

    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"top1", "params", "macs", "latency", "size_bytes"} <= set(payload)
    r = run_cli("methods")
    assert r.returncode == 0 and "l1-norm" in r.stdout and "net-slim" in r.stdout


def test_finetune_keep_zeros_after_magnitude(tmp_path):
    torch.manual_seed(0)
    model = pk.models.create("digits_cnn", num_classes=10, in_channels=1)
    pk.prune(model, "magnitude", torch.randn(1, 1, 8, 8), sparsity=0.8, rule="layer-std")
    pk.save(model, tmp_path / "sparse.pt")
    r = run_cli("finetune", "--checkpoint", str(tmp_path / "sparse.pt"), "--data", "digits", "--epochs", "1",
                "--device", "cpu", "--keep-zeros", "--out", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    tuned = pk.load(tmp_path / "ft" / "model.pt")
    for (name, a), (_, b) in zip(model.named_parameters(), tuned.named_parameters(), strict=True):
        if name.endswith("weight") and a.dim() > 1:
            assert torch.all(b[a == 0] == 0), name
            assert not torch.equal(a, b), name  # it did train


def test_demo_runs_the_whole_job_and_measures_speed_side_by_side(tmp_path, capsys):
    from prunekit.demo import run_demo

    assert run_demo(tmp_path / "demo", device="cpu") == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy (%)" in out and "speedup eager_b1" in out and "interleaved rounds" in out
    assert (tmp_path / "demo" / "report" / "report.html").exists()
