"""Distillation from the unpruned model (issue 23): the loss is the formula, a distilled fine-tune runs in
the pipeline and resumes after kill -9, and bad distill settings are one error before any training."""

from __future__ import annotations

import copy
import json
import math
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
from prunekit import distill
from prunekit.errors import PrunekitError
from prunekit.pipeline import run, validate

from .test_pipeline import BASE


def _cfg(tmp_path: Path, teacher: str = "base", **ft) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["out"] = str(tmp_path / "run")
    cfg["stages"][2].update(distill={"teacher": teacher, "alpha": 0.7, "temperature": 3.0}, **ft)
    return cfg


def test_loss_equals_the_formula_on_a_hand_computed_batch():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    hard = torch.tensor(0.8)
    alpha, t = 0.7, 2.0
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    want = alpha * t * t * kl / 2 + (1 - alpha) * 0.8
    assert distill.kd_loss(student, teacher, hard, alpha, t).item() == pytest.approx(want, rel=1e-6)
    same = distill.kd_loss(teacher, teacher, torch.tensor(0.0), 1.0, 4.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)  # a student equal to its teacher has nothing to learn


def test_a_distilled_finetune_runs_in_the_pipeline(tmp_path):
    metrics = run(_cfg(tmp_path))
    assert metrics["after"]["top1"] > 50 and metrics["after"]["macs"] < 0.53 * metrics["before"]["macs"]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("stage") == "finetune" and "epoch" in r] == [1, 2]


def test_a_distilled_finetune_resumes_after_kill_9(tmp_path):
    cfg = _cfg(tmp_path, teacher="before", epochs=4, batch_size=16)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "run" / "log.jsonl"

    def finetune_epochs() -> list[int]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [r["epoch"] for r in map(json.loads, lines) if r.get("stage") == "finetune" and "epoch" in r]

    cmd = [sys.executable, "-m", "prunekit", "run", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and len(finetune_epochs()) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "metrics.json").exists()
    done = len(finetune_epochs())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert finetune_epochs() == list(range(1, done + 1)) + list(range(done + 1, 5))


@pytest.mark.parametrize("change, expected", [
    ({"alpha": 1.5}, "alpha must be a number in [0, 1]"),
    ({"temperature": 0}, "temperature must be a finite number > 0"),
    ({"teacher": "nowhere.pt"}, "neither base, before nor a model file"),
    ({"tempreature": 2}, "unknown key"),
])
def test_bad_distill_settings_are_one_error_naming_the_key(change, expected, tmp_path):
    cfg = _cfg(tmp_path)
    cfg["stages"][2]["distill"].update(change)
    with pytest.raises(PrunekitError, match=r"stages\[2\]\.distill.*" + expected.replace("[", r"\[").replace(
            "]", r"\]")):
        validate(cfg)


def test_distill_where_it_cannot_be(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["stages"][1]["distill"] = {"teacher": "base"}
    with pytest.raises(PrunekitError, match="a prune stage does not train"):
        validate(cfg)
    cfg = _cfg(tmp_path)
    cfg["stages"][0]["distill"] = {"teacher": "base"}
    with pytest.raises(PrunekitError, match="a train stage before any sparsify or prune"):
        validate(cfg)
    cfg = _cfg(tmp_path)
    cfg["stages"] = [{"stage": "finetune", "epochs": 1, "distill": {"teacher": "before"}}]
    with pytest.raises(PrunekitError, match="no prune stage comes earlier"):
        validate(cfg)


def test_a_teacher_of_another_class_count_is_refused_before_training(tmp_path):
    other = tmp_path / "other.pt"
    pk.save(pk.models.create("digits_cnn", num_classes=7, in_channels=1), other)
    cfg = _cfg(tmp_path, teacher=str(other))
    with pytest.raises(PrunekitError, match=r"finetune\.distill\.teacher answers with \(2, 7\), the student with "
                                            r"\(2, 10\)"):
        run(cfg)
    assert not (tmp_path / "run" / "stages" / "03-finetune" / "last.pt").exists()  # no epoch was trained


def test_cli_finetune_distils_from_a_model_file(tmp_path, capsys):
    from prunekit.cli import main

    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "2", "--out", str(tmp_path / "t")]) \
        == 0
    base = tmp_path / "t" / "model.pt"
    assert main(["prune", "--checkpoint", str(base), "--method", "l1-norm", "--speedup", "2", "--out",
                 str(tmp_path / "p.pt")]) == 0
    assert main(["finetune", "--checkpoint", str(tmp_path / "p.pt"), "--data", "digits", "--epochs", "1",
                 "--distill", str(base), "--alpha", "0.9", "--out", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "model.pt").exists()
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(tmp_path / "p.pt"), "--data", "digits", "--epochs", "1",
                 "--distill", str(base), "--alpha", "2", "--out", str(tmp_path / "ft2")]) == 2
    assert "--distill.alpha must be a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "ft2").exists()


def test_compare_has_a_distill_axis_with_the_same_budget(tmp_path):
    from prunekit import compare

    from .test_compare import SMALL

    cfg = {**copy.deepcopy(SMALL), "methods": ["l1-norm"], "out": str(tmp_path / "c"),
           "distill": [None, {"teacher": "base", "alpha": 0.5, "temperature": 4}]}
    v = compare.validate(cfg)
    cells = compare._cells(v, compare._entries(v), tmp_path / "c")
    assert [c["id"] for c in cells] == ["l1-norm-2x-s0", "l1-norm+kd-2x-s0", "l1-norm-2x-s1", "l1-norm+kd-2x-s1"]
    plain, kd = cells[0]["config"], cells[1]["config"]
    assert plain["budget"] == kd["budget"] and plain["stages"][-1]["epochs"] == kd["stages"][-1]["epochs"] == "rest"
    assert "distill" not in plain["stages"][-1] and kd["stages"][-1]["distill"]["teacher"] == "base"
    with pytest.raises(PrunekitError, match=r"distill\[1\]\.alpha"):
        compare.validate({**cfg, "distill": [None, {"teacher": "base", "alpha": -1}]})
