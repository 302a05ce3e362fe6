"""prunekit.prune: every structured method hits its MACs target and its model round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from scipy.stats import wasserstein_distance

import prunekit as pk
from prunekit import criteria
from prunekit.errors import PrunekitError

STRUCTURED = ["l1-norm", "l2-norm", "fpgm", "net-slim", "random", "dist-fit"]


def _resnet56_with_varied_bn(seed: int = 0):
    torch.manual_seed(seed)
    model = pk.models.create("resnet56")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # a trained net's |γ| differ; a fresh one's are all 1
            m.weight.data.uniform_(0.05, 1.0)
    return model.eval()


@pytest.mark.parametrize("method", STRUCTURED)
def test_speedup_target_and_fresh_process_round_trip(method, tmp_path):
    model = _resnet56_with_varied_bn()
    x = torch.randn(4, 3, 32, 32)
    result = pk.prune(model, method, x[:1], speedup=2.0)
    assert 1.94 <= result.speedup <= 2.06, result.summary()
    assert result.after["params"] < result.before["params"]
    with torch.no_grad():
        out = result.model.eval()(x)
    path = tmp_path / "pruned.pt"
    pk.save(result.model, path)
    torch.save({"x": x, "out": out}, tmp_path / "io.pt")
    obj = torch.load(path, weights_only=True)  # no pickled code in the file
    assert obj["format"] == "prunekit-model" and obj["arch"]["name"] == "resnet56"
    code = (
        "import torch, prunekit as pk, sys\n"
        f"m = pk.load({str(path)!r}); d = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): y = m(d['x'])\n"
        "sys.exit(0 if torch.equal(y, d['out']) else 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_methods_registry_and_targets():
    names = [m.name for m in pk.methods.available()] if hasattr(pk, "methods") else []
    from prunekit import methods

    names = [m.name for m in methods.available()]
    assert set(STRUCTURED) <= set(names)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(PrunekitError, match="needs a speedup"):
        pk.prune(pk.models.create("resnet20"), "l1-norm", x)
    with pytest.raises(PrunekitError, match="out of reach"):
        pk.prune(pk.models.create("resnet20"), "l1-norm", x, speedup=500.0)


def test_net_slim_percentile_removes_that_share_of_channels():
    model = _resnet56_with_varied_bn()
    x = torch.randn(1, 3, 32, 32)
    res = pk.prune(model, "net-slim", x, percentile=30.0)
    before = sum(b for b, _ in res.channels.values())
    after = sum(a for _, a in res.channels.values())
    assert abs((before - after) / before - 0.30) < 0.02


def test_torchvision_model_prunes_and_round_trips(tmp_path):
    model = pk.models.create("tv:resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    res = pk.prune(model, "l1-norm", x[:1], speedup=1.5)
    assert abs(res.speedup - 1.5) / 1.5 < 0.03
    pk.save(res.model, tmp_path / "r18.pt")
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path / "r18.pt")(x), res.model(x))


def test_dist_fit_keeps_quantile_picks():
    norms = torch.tensor([5.0, 0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0])  # channel i has a distinct norm
    kept = criteria.distribution_fit_keep(norms, 5)
    # sorted norms 0..9: quantiles (j+0.5)/5 pick sorted positions 1, 3, 5, 7, 9 -> norms 1, 3, 5, 7, 9
    assert sorted(float(norms[i]) for i in kept) == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert criteria.distribution_fit_keep(norms, 10) == list(range(10))


def test_dist_fit_redundancy_tie_break_deletes_the_duplicate():
    norms = torch.tensor([1.0, 3.0, 5.0, 5.0, 7.0, 9.0])
    filters = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # keep 3 of 6: strata {0,1}, {2,3}, {4,5}; the middle stratum's channels 2 and 3 tie on norm 5.0;
    # the plain quantile pick is 3, but 3 duplicates the kept channel 1, so 3 is deleted and 2 kept
    kept = criteria.distribution_fit_keep(norms, 3, filters)
    assert kept == [1, 2, 5]
    assert criteria.distribution_fit_keep(norms, 3) == [1, 3, 5]  # without filters: plain quantile picks


def test_dist_fit_fits_distribution_better_than_l1():
    x = torch.randn(1, 3, 32, 32)
    res_fit = pk.prune(_resnet56_with_varied_bn(1), "dist-fit", x, speedup=2.0)
    norms = res_fit.info["norms"]
    res_l1 = pk.prune(_resnet56_with_varied_bn(1), "l1-norm", x, speedup=2.0)
    pruned = 0
    for name, rec in norms.items():
        all_norms = torch.tensor(rec["norms"])
        k = len(rec["kept"])
        if k == len(all_norms):
            continue
        pruned += 1
        l1_kept = sorted(set(range(len(all_norms))) - set(res_l1.removed[name]))
        assert len(l1_kept) == k
        w_fit = wasserstein_distance(all_norms[rec["kept"]].numpy(), all_norms.numpy())
        w_l1 = wasserstein_distance(all_norms[l1_kept].numpy(), all_norms.numpy())
        assert w_fit < w_l1, name
    assert pruned >= 20


SWEEP_SAMPLE = ["resnet18", "resnext50_32x4d", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                "squeezenet1_1", "regnet_x_400mf", "mnasnet0_5", "googlenet", "convnext_tiny"]


@pytest.mark.parametrize("name", SWEEP_SAMPLE)
def test_torchvision_prunability_sample(name):
    """A sample of the full sweep (benchmarks/tv_sweep.py; results in the README): l1-norm at 1.5x, forward."""
    torch.manual_seed(0)
    model = pk.models.create(f"tv:{name}", num_classes=10).eval()
    res = pk.prune(model, "l1-norm", torch.randn(1, 3, 64, 64), speedup=1.5)
    assert abs(res.speedup - 1.5) <= 0.045
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
