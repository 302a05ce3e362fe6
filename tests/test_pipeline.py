"""prunekit run: validated configs, staged resumable runs, refusal of foreign run dirs, faults."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.pipeline import load_config, run, validate

from .conftest import run_cli

BASE = {
    "name": "digits-l1",
    "model": {"name": "digits_cnn"},
    "data": {"name": "digits", "batch_size": 64},
    "method": {"name": "l1-norm"},
    "target": {"speedup": 2.0},
    "device": "cpu",
    "out": "unused",
    "stages": [
        {"stage": "train", "epochs": 3, "lr": 0.1, "label_smoothing": 0.0},
        {"stage": "prune"},
        {"stage": "finetune", "epochs": 2, "lr": 0.05, "label_smoothing": 0.0},
    ],
}


def _cfg(tmp_path: Path, **changes) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["out"] = str(tmp_path / "run")
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(epochz=3), "'epochz': unknown key"),
    (lambda c: c["stages"][0].update(epochs="three"), "stages[0]"),
    (lambda c: c["stages"][0].update(stage="warmup"), "unknown stage 'warmup'"),
    (lambda c: c["method"].update(name="magic"), "method.name"),
    (lambda c: c["target"].update(speedup=0.5), "target.speedup"),
    (lambda c: c["data"].update(limit="all"), "data.limit"),
    (lambda c: c["stages"][2].update(lr=-1), "lr"),
    (lambda c: c["model"].update(name="resnet21"), "model.name"),
])
def test_config_errors_name_the_key(tmp_path, mutate, needle):
    cfg = _cfg(tmp_path)
    mutate(cfg)
    with pytest.raises(PrunekitError) as e:
        validate(cfg)
    assert needle in str(e.value) and "config error" in str(e.value)


def test_example_configs_are_valid():
    from prunekit import compare

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        (compare.load_config if path.name.startswith("compare-") else load_config)(path)
    for path in sorted((root / "benchmarks" / "compare").glob("*.yaml")):  # the protocols are compare configs
        compare.load_config(path)


def test_run_dir_layout_resume_and_foreign_config(tmp_path):
    cfg = _cfg(tmp_path)
    metrics = run(cfg)
    d = Path(cfg["out"])
    for p in ("config.yaml", "log.jsonl", "metrics.json", "report.md", "report.html",
              "stages/01-train/model.pt", "stages/02-prune/model.pt", "stages/03-finetune/model.pt"):
        assert (d / p).exists(), p
    assert metrics["after"]["macs"] < 0.53 * metrics["before"]["macs"]
    assert metrics["after"]["top1"] > 85
    log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epoch" in r] == [1, 2, 3, 1, 2]
    assert [r["stage"] for r in log if r.get("event") == "stage_done"] == ["train", "prune", "finetune"]
    pruned = pk.load(d / "stages/02-prune/model.pt")
    assert sum(p.numel() for p in pruned.parameters()) == metrics["after"]["params"]

    t0 = time.perf_counter()
    again = run(cfg)  # everything is done: nothing retrains
    assert time.perf_counter() - t0 < 30
    assert again["after"]["top1"] == metrics["after"]["top1"]
    assert len((d / "log.jsonl").read_text().splitlines()) == len(log)

    changed = copy.deepcopy(cfg)
    changed["target"]["speedup"] = 3.0
    with pytest.raises(PrunekitError, match="belongs to another config.*target"):
        run(changed)
    forced = run(changed, force=True)
    assert forced["after"]["macs"] < 0.36 * forced["before"]["macs"]


def test_kill_mid_epoch_and_resume(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["stages"][0].update(epochs=4, batch_size=16)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = Path(cfg["out"]) / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", "run", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (Path(cfg["out"]) / "metrics.json").exists()
    r = run_cli("run", str(cfg_path))
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines() if '"epoch"' in x]
    assert epochs == [1, 2, 3, 4, 1, 2]


def test_unwritable_out_dir_and_disk_full(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PrunekitError, match="cannot write run directory"):
        run(_cfg(tmp_path, out=str(blocker / "run")))

    cfg = _cfg(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("stage") == "prune":
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(PrunekitError, match="No space left"):
        run(cfg)
    monkeypatch.undo()
    stage = Path(cfg["out"]) / "stages" / "02-prune"
    assert not (stage / "done.pt").exists()  # nothing half-written looks complete
    assert run(cfg)["after"]["macs"] < 0.53 * 2968832


def test_checkpoint_from_a_different_model(tmp_path):
    other = pk.models.create("digits_cnn", num_classes=5, in_channels=1)
    pk.save(other, tmp_path / "five.pt")
    cfg = _cfg(tmp_path, model={"checkpoint": str(tmp_path / "five.pt")})
    with pytest.raises(PrunekitError, match="5 classes"):
        run(cfg)


def test_cli_run_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: digits_cnn}\ndata: {name: digits}\nout: x\nstages: [{stage: train, lr: fast}]\n")
    r = run_cli("run", str(bad))
    assert r.returncode == 2 and "stages[0]" in r.stderr and "Traceback" not in r.stderr


def test_magnitude_schedule_as_cycles_keeps_zeros(tmp_path):
    cfg = _cfg(tmp_path, method={"name": "magnitude"}, target={"schedule": [0.5, 0.75]})
    cfg["stages"] = [{"stage": "train", "epochs": 2, "lr": 0.1, "label_smoothing": 0.0},
                     {"stage": "cycle", "max_cycles": 2,
                      "stages": [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "lr": 0.02}]}]
    metrics = run(cfg)
    d = Path(cfg["out"]) / "stages"
    assert sorted(p.name for p in d.iterdir()) == ["01-train", "02-prune-c1", "03-finetune-c1", "04-prune-c2",
                                                   "05-finetune-c2"]
    model = pk.load(d / "05-finetune-c2" / "model.pt")
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.75) < 0.001  # the fine-tune did not revive pruned weights
    assert metrics["after"]["nonzero_params"] < 0.3 * metrics["before"]["params"]


def test_adaptive_slim_cycle_runs_and_logs_each_round(tmp_path):
    # the first round must prune something (else the run stops): a start whose |γ| sparsity training has split,
    # half of each BN's scales near zero (as the torchvision sweep sets them)
    torch.manual_seed(0)
    start = pk.models.create("digits_cnn", in_channels=1)
    for m in start.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data[::2] = 1e-3 * torch.rand(m.weight[::2].shape)
    pk.save(start, tmp_path / "start.pt")
    cfg = _cfg(tmp_path, method={"name": "adaptive-slim"}, target={"learned": True},
               model={"checkpoint": str(tmp_path / "start.pt")})
    cfg["stages"] = [{"stage": "cycle", "max_cycles": 2, "tolerance": 50.0,
                      "stages": [{"stage": "sparsify", "epochs": 1, "lr": 0.02, "schedule": "constant", "s": 0.01},
                                 {"stage": "prune"}, {"stage": "finetune", "epochs": 1, "lr": 0.02}]}]
    run(cfg)
    events = [json.loads(x) for x in (Path(cfg["out"]) / "log.jsonl").read_text().splitlines()]
    cycles = [e for e in events if e.get("event") == "cycle_done"]
    assert 1 <= len(cycles) <= 2 and all("macs_removed" in e for e in cycles)
    prune_stage = next((Path(cfg["out"]) / "stages").glob("*-prune-c1"))
    info = torch.load(prune_stage / "done.pt", weights_only=True)["prune"]["info"]
    assert "threshold" in info and "channel_fit" in info


def test_pipeline_under_torchrun_two_processes_with_a_distilled_finetune(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path)
    cfg["stages"][0]["epochs"] = 2
    cfg["stages"][2]["epochs"] = 1
    cfg["stages"][2]["distill"] = {"teacher": "base"}  # the teacher's forward runs beside DDP in every process
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "prunekit", "run", str(cfg_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, "\n".join(x for x in r.stderr.splitlines() if "Warning" not in x)[:3000]
    log = [json.loads(x) for x in (Path(cfg["out"]) / "log.jsonl").read_text().splitlines()]
    assert {x["world_size"] for x in log if "epoch" in x} == {2}
    metrics = json.loads((Path(cfg["out"]) / "metrics.json").read_text())
    assert metrics["after"]["macs"] < 0.53 * metrics["before"]["macs"]


def test_a_first_prune_that_removes_nothing_stops_the_run_with_the_reason(tmp_path):
    cfg = _cfg(tmp_path, method={"name": "adaptive-slim"}, target={"learned": True},
               stages=[{"stage": "train", "epochs": 1, "lr": 0.05}, {"stage": "prune"}])
    with pytest.raises(PrunekitError, match=r"prune: adaptive-slim removed nothing: .*; train sparsity longer or "
                                            r"stronger"):
        run(cfg)
    assert not (Path(cfg["out"]) / "metrics.json").exists()


def test_a_run_whose_folder_is_removed_mid_run_stops_instead_of_recreating_it(tmp_path, monkeypatch):
    import shutil

    from prunekit.tasks import classify

    cfg = _cfg(tmp_path, stages=[{"stage": "train", "epochs": 1, "lr": 0.05}])
    real_fit = classify.fit

    def fit_then_remove(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        shutil.rmtree(cfg["out"])  # someone deletes the run folder while the stage trains
        return out

    monkeypatch.setattr(classify, "fit", fit_then_remove)
    with pytest.raises(PrunekitError, match="was removed while the run was going"):
        run(cfg)
    assert not (Path(cfg["out"]) / "stages" / "01-train" / "model.pt").exists()


def test_a_run_resumed_after_its_prune_reports_the_pruned_model_before_fine_tuning(tmp_path, monkeypatch):
    """'pruned' is the test metric straight after pruning, also when the prune stage was finished by an earlier
    process (the fine-tune must not train the model that 'pruned' is measured on)."""
    from prunekit.tasks import classify
    from prunekit.train import evaluate

    cfg = _cfg(tmp_path)
    real_fit = classify.fit

    def stop_at_finetune(*args, desc="", **kwargs):
        if desc == "finetune":
            raise KeyboardInterrupt  # the process is stopped after the prune stage finished
        return real_fit(*args, desc=desc, **kwargs)

    monkeypatch.setattr(classify, "fit", stop_at_finetune)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    metrics = run(cfg)
    bundle = pk.data.load("digits", seed=0).holdout(0.1, seed=0)
    pruned = pk.load(Path(cfg["out"]) / "stages" / "02-prune" / "model.pt")
    assert metrics["pruned"]["top1"] == pytest.approx(evaluate(pruned, bundle.eval_loader(bundle.test, 256))["top1"])
    assert metrics["pruned"]["top1"] != metrics["after"]["top1"]
    # the run's seconds include the stages the first process ran (the recommendation picks the cheapest by them)
    walls = [pk.io.safe_load(d / "done.pt")["wall_s"] for d in sorted((Path(cfg["out"]) / "stages").iterdir())]
    assert len(walls) == 3 and all(w >= 0 for w in walls) and sum(walls) > 0  # a prune can take < 0.05 s
    assert metrics["wall_s"] >= sum(walls)


def test_a_run_kept_with_only_its_last_stage_models_is_measured_again(tmp_path):
    """A finished run whose intermediate stage models were deleted (to save space) re-measures from the last
    stage's model; a stage that still has to run from a removed model says so instead of a missing-file trace."""
    cfg = _cfg(tmp_path)
    first = run(cfg)
    d = Path(cfg["out"])
    (d / "stages/02-prune/model.pt").unlink()
    (d / "metrics.json").unlink()  # measured again, as an unsigned metrics file would be
    again = run(cfg)
    assert again["after"]["top1"] == first["after"]["top1"]
    assert again["after"]["macs"] == first["after"]["macs"]
    assert "pruned" not in again  # not measurable any more: said by its absence, not invented
    assert again["wall_s"] >= first["wall_s"] - 5  # the stages' recorded seconds, not only the re-measure's

    for p in ("stages/03-finetune/done.pt", "metrics.json"):
        (d / p).unlink()
    with pytest.raises(PrunekitError, match="02-prune/model.pt was removed and a stage still needs it; use --force"):
        run(cfg)
