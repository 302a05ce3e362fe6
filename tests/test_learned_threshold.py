"""thresholds.learn_threshold: a cut between two populations, none in a single one, plottable output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prunekit import thresholds
from prunekit.thresholds import learn_threshold


def _two_populations(n: int = 400, frac: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``frac`` of the values near 1e-3, the rest near 0.5 (log-normal, 0.1 decade spread)."""
    rng = np.random.default_rng(seed)
    k = int(frac * n)
    return 1e-3 * 10 ** rng.normal(0, 0.1, k), 0.5 * 10 ** rng.normal(0, 0.1, n - k)


def test_cut_falls_between_two_populations():
    small, large = _two_populations()
    fit = learn_threshold(torch.tensor(np.r_[large, small]))  # tensors and arrays alike, order irrelevant
    assert fit.bimodal and fit.method == "em" and fit.reason == ""
    assert small.max() < fit.threshold < large.min()
    assert fit.cut == pytest.approx(np.log10(fit.threshold))
    assert fit.weights[0] == pytest.approx(0.3, abs=0.01)
    assert fit.means == pytest.approx((-3.0, np.log10(0.5)), abs=0.05)
    assert fit.separation > 10 and fit.valley < 0.1


@pytest.mark.parametrize("values", [
    np.random.default_rng(1).uniform(0.4, 1.0, 400),  # flat: a two-Gaussian fit still splits it with D > 2
    10 ** np.random.default_rng(2).normal(-0.3, 0.3, 400),  # one log-normal hump
    np.abs(np.random.default_rng(3).normal(0.7, 0.1, 2000)),
    np.full(50, 0.7),
], ids=["uniform", "lognormal", "normal", "constant"])
def test_one_population_prunes_nothing(values):
    fit = learn_threshold(values)
    assert fit.threshold is None and fit.cut is None and not fit.bimodal and fit.reason


def test_few_values_block_scores():
    rng = np.random.default_rng(4)
    scores = rng.uniform(0.4, 1.0, 27)
    assert learn_threshold(scores).threshold is None
    scores[5] = 1e-3  # one block whose closing BN is negligible
    fit = learn_threshold(scores)
    assert 1e-3 < fit.threshold < np.delete(scores, 5).min()
    assert learn_threshold([0.1, 0.5, 0.6]).threshold is None  # too few to tell


def test_zeros_and_linear_scale():
    small, large = _two_populations(seed=5)
    small[:10] = 0.0  # exact zeros count as eps instead of -inf
    fit = learn_threshold(np.r_[small, large])
    assert small.max() < fit.threshold < large.min()
    rng = np.random.default_rng(6)
    lin = np.r_[rng.normal(1.0, 0.1, 100), rng.normal(5.0, 0.3, 300)]  # any score, without the log
    fit = learn_threshold(lin, log=False)
    assert fit.bimodal and lin[:100].max() < fit.threshold < lin[100:].min()


def test_otsu_fallback_when_em_degenerates(monkeypatch):
    monkeypatch.setattr(thresholds, "_em", lambda *a, **k: None)
    small, large = _two_populations(seed=7)
    fit = learn_threshold(np.r_[small, large])
    assert fit.method == "otsu" and fit.bimodal and small.max() < fit.threshold < large.min()
    fit = learn_threshold(np.random.default_rng(8).uniform(0.4, 1.0, 400))
    assert fit.method == "otsu" and fit.threshold is None


def test_fit_carries_what_the_report_plots():
    small, large = _two_populations(n=200, seed=9)
    fit = learn_threshold(np.r_[small, large])
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["samples"] == pytest.approx(np.log10(np.r_[small, large]).tolist())
    assert d["threshold"] == fit.threshold and len(d["weights"]) == len(d["means"]) == len(d["stds"]) == 2
    grid = np.linspace(-5, 2, 7001)
    lo, hi = fit.densities(grid)
    step = grid[1] - grid[0]
    assert lo.sum() * step == pytest.approx(fit.weights[0], rel=1e-3)
    assert hi.sum() * step == pytest.approx(fit.weights[1], rel=1e-3)
    at = np.searchsorted(grid, fit.cut)  # the cut is where the weighted densities cross
    assert lo[at - 5] > hi[at - 5] and lo[at + 5] < hi[at + 5]


def _skewed_heap(n: int = 5000, alive: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What 40 epochs of sparsity training left on yolov8n (BCCD): most |γ| in a heap near 1e-5.5 whose
    long tail reaches up to 1e-2, and ``alive`` of them in a mode near 0.1. Two Gaussians cannot place it."""
    rng = np.random.default_rng(seed)
    k = int(alive * n)
    heap = -5.5 + np.where(rng.random(n - k) < 0.8, rng.normal(0, 0.3, n - k), rng.exponential(1.0, n - k))
    return 10 ** np.minimum(heap, -2.2), 10 ** rng.normal(-1.0, 0.35, k)


def test_long_tailed_negligible_heap_is_cut_below_the_important_mode():
    small, large = _skewed_heap()
    two = thresholds._em(np.log10(np.r_[small, large]), floor=1e-2)
    assert two is not None and two[2][1] > 1.0  # the best two-Gaussian fit smears its upper component over the tail
    fit = learn_threshold(np.r_[small, large])
    assert fit.bimodal and fit.method == "em-k", fit.reason
    assert np.quantile(small, 0.99) < fit.threshold < np.quantile(large, 0.02)
    assert fit.weights[1] == pytest.approx(0.1, abs=0.03)


def test_long_tailed_heap_alone_prunes_nothing():
    small, _ = _skewed_heap(alive=0.0)
    assert learn_threshold(small).threshold is None
