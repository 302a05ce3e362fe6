"""The budget axis of compare (issue 36): budget 0 is the cut with BN statistics re-estimated and no optimiser
step, a fraction of an epoch runs that share of its steps, every budget gets its own table, best-row mark and
recommendation, a resumed compare across budgets re-runs nothing, and bad budgets fail before any cell."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit import compare
from prunekit.errors import PrunekitError
from prunekit.train import TrainConfig, adapt_bn, fit

BUDGETS = {
    "name": "budget-test", "data": {"name": "digits", "batch_size": 64},
    "base": {"model": {"name": "digits_cnn"}, "train": {"epochs": 2, "lr": 0.1, "label_smoothing": 0.0}},
    "methods": ["l1-norm", {"name": "fpgm", "budgets": [0, 1]}],
    "targets": [2.0], "seeds": [0, 1], "budgets": [0, 0.5, 1], "finetune": {"lr": 0.05, "label_smoothing": 0.0},
    "latency": False,
}


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("budgets") / "out"
    return compare.run(copy.deepcopy(BUDGETS), out=out), out


def test_one_row_per_method_target_and_budget_with_a_best_mark_each(board):
    b, out = board
    assert [(r["method"], r["budget"]) for r in b["rows"]] == [
        ("l1-norm", 0), ("fpgm", 0), ("l1-norm", 0.5), ("l1-norm", 1), ("fpgm", 1)]
    for budget in (0, 0.5, 1):
        assert sum(r["best"] for r in b["rows"] if r["budget"] == budget) == 1
    assert b["cells"]["done"] == 10 and not b["cells"]["failed"]
    md = (out / "leaderboard.md").read_text()
    assert md.count("### Budget") == 3 and "no gradient step" in md
    assert md.count("Recommendation at 2x") == 3
    assert "metric-vs-budget" in (out / "leaderboard.html").read_text()
    assert {p.name for p in (out / "results").iterdir()} >= {"l1-norm-2x-ft0-s0.json", "l1-norm-2x-s1.json"}


def test_budget_zero_changes_nothing_but_bn_statistics(board):
    b, out = board
    cell = out / "cells" / "l1-norm-2x-ft0-s0"
    stages = sorted(p.name for p in (cell / "stages").iterdir())
    assert stages == ["01-prune"]  # no training stage at all
    pruned = pk.load(cell / "stages" / "01-prune" / "model.pt")
    again = compare.final_model_path(cell)
    assert again == cell / "stages" / "01-prune" / "model.pt"
    record = json.loads((out / "results" / "l1-norm-2x-ft0-s0.json").read_text())
    assert record["config"]["method"]["params"]["bn_recalibrate"] == compare.RECALIBRATE
    # a fresh prune of the base without recalibration has the same weights; only BN statistics differ
    base = pk.load(out / b["base"]["checkpoint"])
    x = torch.randn(2, 1, 8, 8)
    plain = pk.prune(base, "l1-norm", x, speedup=2.0).model
    bn_stats = ("running_mean", "running_var", "num_batches_tracked")
    for (k, v), (k2, v2) in zip(plain.state_dict().items(), pruned.state_dict().items(), strict=True):
        assert k == k2 and v.shape == v2.shape
        if not k.endswith(bn_stats):
            assert torch.equal(v, v2), k
    assert any(not torch.equal(v, pruned.state_dict()[k]) for k, v in plain.state_dict().items()
               if k.endswith("running_mean"))


def test_a_fraction_of_an_epoch_runs_that_share_of_its_steps():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(8)]
    steps = []
    fit(model, batches, None, TrainConfig(epochs=0.25, lr=0.1, amp=False, channels_last=False),
        device="cpu", after_step=lambda m: steps.append(1))
    assert len(steps) == 2
    with pytest.raises(PrunekitError, match="zero optimiser steps"):
        fit(model, batches, None, TrainConfig(epochs=0.01, lr=0.1, amp=False, channels_last=False), device="cpu")


def test_adapt_bn_touches_only_bn_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    before = copy.deepcopy(net.state_dict())
    adapt_bn(net, [(torch.randn(4, 1, 6, 6) * 3 + 1,)])
    after = net.state_dict()
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(before[k], after[k])
    assert net[1].momentum == 0.1 and net.training


def test_a_resumed_compare_across_budgets_reruns_nothing(board, capsys):
    b, out = board
    again = compare.run(copy.deepcopy(BUDGETS), out=out)
    assert [r["metric_per_seed"] for r in again["rows"]] == [r["metric_per_seed"] for r in b["rows"]]
    assert "(done)" in capsys.readouterr().err
    partial = compare.run(copy.deepcopy(BUDGETS), out=out, board_only=True)
    assert partial["cells"]["done"] == 10


def test_the_recommendation_says_when_no_method_leads():
    row = lambda m, mean, std, wall: {"method": m, "target": "2x", "budget": 1, "metric_mean": mean,  # noqa: E731
                                      "metric_std": std, "wall_s": wall}
    rows = [row("a", 80.0, 0.5, 30), row("b", 79.8, 0.5, 10), row("c", 70.0, 0.1, 5)]
    compare._mark_best(rows)
    lines = compare.recommend({"rows": rows, "budget": 1})
    assert lines == ["Recommendation at 2x, budget 1 epochs: no method leads beyond the spread: use the cheapest, "
                     "b (10 s per cell; 2 rows level)"]
    rows[1]["wall_s"] = None  # its cells ran before prunekit recorded stage times: no cheapest is named
    assert compare.recommend({"rows": rows, "budget": 1}) == [
        "Recommendation at 2x, budget 1 epochs: no method leads beyond the spread (2 rows level); the cheapest is "
        "not known: no wall time for b"]
    rows[1]["metric_mean"] = 75.0
    compare._mark_best(rows)
    assert "use a: it leads by 5.00 points, beyond the spread" in compare.recommend({"rows": rows, "budget": 1})[0]


@pytest.mark.parametrize("change, expected", [
    ({"budgets": []}, "budgets"),
    ({"budgets": [-1]}, "not a number of epochs"),
    ({"budgets": ["two"]}, "not a number of epochs"),
    ({"budgets": [1, 1]}, "appears twice"),
    ({"methods": [{"name": "net-slim", "sparsify": {"s": 0.01}}]}, "sparsity epochs do not fit the budget of 0"),
    ({"budgets": [0.001]}, "rounds to zero steps"),
])
def test_bad_budgets_fail_before_any_cell(change, expected, tmp_path):
    with pytest.raises(PrunekitError, match=expected):
        compare.run({**copy.deepcopy(BUDGETS), **change}, out=tmp_path / "out")
    assert not (tmp_path / "out" / "cells").exists()


def test_a_single_seed_lead_is_not_called_beyond_the_spread():
    rows = [{"method": m, "target": "2x", "budget": 1, "metric_mean": v, "metric_std": 0.0, "wall_s": 1,
             "seeds": [0]} for m, v in (("a", 80.1), ("b", 80.0))]
    compare._mark_best(rows)
    assert rows[0]["best"] and rows[0]["lead_beyond_spread"] is None
    assert "single seed: no spread" in compare.recommend({"rows": rows, "budget": 1})[0]
