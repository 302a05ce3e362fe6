"""S0 adaptive-slim: sparsity regulariser, learned channel/block thresholds, exact β compensation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.methods.adaptive_slim import compensate_beta, sparsify
from prunekit.train import BNSparsity, TrainConfig

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _bn_init(model: nn.Module, lo: float, hi: float, beta: float = 0.5, seed: int = 0) -> nn.Module:
    """Varied BN statistics with γ ~ U(lo, hi): a fresh net's γ are all 1 and its β all 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = lo + (hi - lo) * torch.rand(n, generator=g)
            m.bias.data = beta * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    return model.eval()


def _set_gamma(model: nn.Module, group, idx: list[int], value: float | torch.Tensor) -> None:
    for name in group.bns:
        model.get_submodule(name).weight.data[idx] = value


def _circular(*models: nn.Module) -> None:
    """Circular padding keeps a constant map constant, so a folded constant is exact at borders too."""
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.padding_mode = "circular"


# ---- sparsity training ----
def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))


def test_bn_sparsity_adds_l1_subgradient_to_chosen_bns():
    model = _tiny()
    model[1].weight.data = torch.tensor([0.5, -0.2, 0.0, 1.0])
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    g1, g4 = model[1].weight.grad.clone(), model[4].weight.grad.clone()
    BNSparsity(0.1, bns=["1"])(model)
    assert torch.allclose(model[1].weight.grad, g1 + 0.1 * torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert torch.equal(model[4].weight.grad, g4)  # not in the list
    BNSparsity(0.1)(model)  # no list: every BN
    assert torch.allclose(model[4].weight.grad, g4 + 0.1 * torch.sign(model[4].weight))


@pytest.mark.parametrize("decay,expect", [("constant", [1, 1, 1, 1]), ("linear", [1, 0.5, 0, 0]),
                                          ("cosine", [1, 0.5, 0, 0])])
def test_bn_sparsity_schedules(decay, expect):
    hook = BNSparsity(1e-2, decay, total_steps=10)
    rates = []
    for step in (0, 5, 10, 20):
        hook.step = step
        rates.append(hook.rate() / 1e-2)
    assert rates == pytest.approx(expect, abs=1e-12)
    with pytest.raises(PrunekitError, match="decay"):
        BNSparsity(1e-2, "step")
    with pytest.raises(PrunekitError, match="total_steps"):
        BNSparsity(1e-2, "cosine")


def test_sparsify_trains_with_the_penalty_and_shrinks_gamma():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    loader = DataLoader(data, batch_size=16)
    cfg = TrainConfig(epochs=1, lr=0.05, schedule="constant", momentum=0.0, nesterov=False, weight_decay=0.0,
                      label_smoothing=0.0, amp=False, channels_last=False)
    l1 = {}
    for s in (0.0, 0.05):
        torch.manual_seed(0)
        model, result = sparsify(pk.models.create("digits_cnn"), loader, None, cfg, s, device="cpu",
                                 example_inputs=torch.randn(1, 1, 8, 8))
        assert result.history[-1]["stage"] == "sparsify"
        l1[s] = sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    n_gamma = 32 + 64 + 64 + 128
    assert l1[0.05] < l1[0.0] - 0.5 * 0.05 * 0.05 * 4 * n_gamma  # ≈ lr·s per step, 4 steps, on every γ


# ---- channel pruning through prunekit.prune ----
def test_exactly_the_small_population_is_removed():
    model = _bn_init(pk.models.create("resnet20"), 0.3, 0.7)
    pg = PruneGraph(model, X[:1])
    g = torch.Generator().manual_seed(1)
    small = {}
    for grp in pg.groups:
        small[grp.name] = sorted(torch.randperm(grp.size, generator=g)[: int(0.3 * grp.size)].tolist())
        _set_gamma(model, grp, small[grp.name], 1e-3 * (1 + 0.2 * torch.rand(len(small[grp.name]), generator=g)))
    every = next(grp for grp in pg.groups if grp.name == "layer1.1.conv1")  # all tiny: only its largest stays
    _set_gamma(model, every, list(range(every.size)), 1e-3 * (1 + torch.rand(every.size, generator=g)))
    largest = int(model.layer1[1].bn1.weight.argmax())
    stem = next(grp for grp in pg.groups if grp.name == "conv1")  # residual group: bn1 + three block bn2
    union = next(c for c in range(stem.size) if c not in small["conv1"])
    model.bn1.weight.data[union] = 1e-3  # small in one BN only: the mask union keeps it
    res = pk.prune(model, "adaptive-slim", X[:1])
    expect = {**small, "layer1.1.conv1": [c for c in range(16) if c != largest]}
    assert res.removed == expect
    assert res.channels["layer1.1.conv1"] == (16, 1) and res.blocks_removed == []
    assert res.info["channel_fit"]["bimodal"] and res.info["block_fit"]["threshold"] is None
    assert res.info["macs_removed"] == pytest.approx(1 - res.after["macs"] / res.before["macs"])
    json.dumps(res.to_dict())  # the report reads it back
    with torch.no_grad():
        assert res.model(X).shape == (2, 10)


def test_one_population_prunes_nothing():
    model = _bn_init(pk.models.create("resnet20"), 0.4, 1.0)
    params = sum(p.numel() for p in model.parameters())
    res = pk.prune(model, "adaptive-slim", X[:1])
    assert res.removed == {} and res.blocks_removed == [] and res.after["macs"] == res.before["macs"]
    assert not res.info["channel_fit"]["bimodal"] and not res.info["block_fit"]["bimodal"]
    assert sum(p.numel() for p in model.parameters()) == params


def test_speedup_caps_what_is_removed():
    results = {}
    for cap in (None, 1.15):
        model = _bn_init(pk.models.create("resnet20"), 0.3, 0.7)
        pg = PruneGraph(model, X[:1])
        g = torch.Generator().manual_seed(2)
        small = {grp.name: torch.randperm(grp.size, generator=g)[: grp.size // 3].tolist() for grp in pg.groups}
        for grp in pg.groups:
            _set_gamma(model, grp, small[grp.name], 1e-3 * (1 + torch.rand(len(small[grp.name]), generator=g)))
        results[cap] = pk.prune(model, "adaptive-slim", X[:1], speedup=cap)
    assert results[None].speedup > 1.3
    assert 1.12 < results[1.15].speedup <= 1.15  # a cap, met from below one channel at a time
    assert all(set(idx) <= set(small[name]) for name, idx in results[1.15].removed.items())


# ---- β compensation ----
def _removal_pattern(size: int) -> list[int]:
    """Every third channel of the upper half: on ResNets a stage's removed residual channels never include one
    that the option-A shortcut carries over from the previous stage (that one is not constant), while the
    previous stage's removed channels do cross into kept ones (folded across the add)."""
    return [c for c in range(size) if c % 3 == 0 and c >= size // 2]


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn"])
def test_beta_compensation_is_exact(name):
    """Pruned == original with the pruned γ set to 0, for any β; exact at borders under circular padding."""
    model = _bn_init(pk.models.create(name), 0.1, 0.3)  # small γ: the 27-block residual stream stays O(1)
    pg = PruneGraph(model, X[:1])
    ref = copy.deepcopy(model)
    for grp in pg.groups:
        _set_gamma(model, grp, _removal_pattern(grp.size), 1e-3)
        _set_gamma(ref, grp, _removal_pattern(grp.size), 0.0)
    res = pk.prune(model, "adaptive-slim", X[:1], layers=False)
    assert res.removed == {grp.name: _removal_pattern(grp.size) for grp in pg.groups}
    assert res.info["uncompensated"] == []
    _circular(model, ref)
    with torch.no_grad():
        out, want = model(X), ref(X)
    assert want.abs().max() > 0.1 and torch.allclose(out, want, atol=1e-4, rtol=0), (out - want).abs().max()


def test_beta_compensation_with_zero_padding():
    """With zero padding a constant folded into a 3x3 consumer is off on the border ring, which no bias can
    reproduce: there the removed channels get act(β) = 0; the last layer's, read by the classifier, β > 0."""
    model = _bn_init(pk.models.create("vgg16_bn"), 0.1, 0.3)
    pg = PruneGraph(model, X[:1])
    ref = copy.deepcopy(model)
    for grp in pg.groups:
        idx = _removal_pattern(grp.size)
        beta = 0.5 if any(name == "classifier" for name, _, _ in grp.members) else -0.5
        for m in (model, ref):
            for name in grp.bns:
                m.get_submodule(name).bias.data[idx] = beta
        _set_gamma(model, grp, idx, 1e-3)
        _set_gamma(ref, grp, idx, 0.0)
    res = pk.prune(model, "adaptive-slim", X[:1], layers=False)
    assert res.info["uncompensated"] == [] and not torch.equal(model.classifier.bias, ref.classifier.bias)
    with torch.no_grad():
        assert torch.allclose(model(X), ref(X), atol=1e-4, rtol=0)


def test_channels_that_carry_a_shortcut_are_reported_not_folded():
    model = _bn_init(pk.models.create("resnet20"), 0.3, 0.7)
    pg = PruneGraph(model, X[:1])
    stage2 = next(grp for grp in pg.groups if grp.name == "layer2.0.shortcut")
    mean = model.layer2[1].bn1.running_mean.clone()
    # 0..15 still carry stage 1's channels through the option-A shortcut; 20..27 are constants
    left = compensate_beta(pg, {stage2.index: list(range(16)) + list(range(20, 28))})
    assert "layer2.1.conv1" in left and "layer3.0.shortcut" in left
    assert not torch.equal(model.layer2[1].bn1.running_mean, mean)  # the constant ones are folded all the same


# ---- layer pruning ----
def test_block_with_negligible_closing_bn_is_removed():
    model = _bn_init(pk.models.create("resnet20"), 0.5, 1.5)
    model.layer2[1].bn2.weight.data.fill_(1e-3)
    model.layer2[1].bn2.bias.data.zero_()
    ref = copy.deepcopy(model)
    ref.layer2[1].bn2.weight.data.zero_()
    res = pk.prune(model, "adaptive-slim", X[:1])
    assert res.blocks_removed == ["layer2.1"] and isinstance(model.layer2[1], nn.Identity)
    assert res.removed == {}  # the channel |γ| (max over each group's BNs) stay single-humped
    assert res.info["block_scores"]["layer2.1"] == pytest.approx(1e-3)
    assert res.after["macs"] < res.before["macs"] and math.isclose(
        res.info["macs_removed"], 1 - res.after["macs"] / res.before["macs"])
    with torch.no_grad():
        assert torch.allclose(model(X), ref(X), atol=1e-4)
