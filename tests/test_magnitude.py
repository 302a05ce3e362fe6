"""S4 magnitude: exact sparsity targets, masks that survive retraining, the iterative schedule, the scan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.masks import Masks
from prunekit.methods.magnitude import (
    iterative_prune,
    magnitude_masks,
    prunable_layers,
    sensitivity_scan,
)
from prunekit.train import TrainConfig, evaluate, fit


@pytest.fixture(scope="module")
def digits():
    bundle = pk.data.load("digits")
    return bundle.loaders(batch_size=64)


def _digits_model() -> nn.Module:
    torch.manual_seed(0)
    return pk.models.create("digits_cnn", num_classes=10, in_channels=1)


def _prunable_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in prunable_layers(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.9375])
def test_global_rule_meets_sparsity_and_leaves_bias_bn_and_frozen_convs(target):
    torch.manual_seed(0)
    model = pk.models.create("resnet20")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    others = {n: t.clone() for n, t in model.state_dict().items()
              if not (n.endswith(".weight") and n.removesuffix(".weight") in prunable_layers(model))}
    x = torch.randn(2, 3, 32, 32)
    result = pk.prune(model, "magnitude", x, sparsity=target)
    assert abs(_prunable_sparsity(model) - target) < 1e-3
    assert abs(result.info["sparsity"] - target) < 1e-3
    assert result.after["params"] == result.info["nonzero_params"] == pk.measure(model, x, with_latency=False)[
        "nonzero_params"]
    assert result.after["macs"] == result.before["macs"] > result.info["sparse_macs"]
    assert result.before["macs"] == pk.measure(model, x, with_latency=False)["macs"]  # per image, not per batch
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in others.items())  # BN, biases, buffers untouched
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], p) for n, p in frozen.items())
    json.dumps(result.to_dict())  # what the CLI stores next to the model


def test_layer_std_rule_thresholds_and_exact_target():
    model = _digits_model()
    layers = prunable_layers(model)
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    masks = magnitude_masks(model, rule="layer-std", q=0.7)
    for n, w in original.items():
        alive = w[w != 0]
        assert torch.equal(masks.masks[f"{n}.weight"], w.abs() >= 0.7 * alive.std())
    q = {n: 1.0 for n in layers} | {"features.0": 0.0}  # q = 0 leaves a layer dense
    masks = magnitude_masks(model, rule="layer-std", q=q, sparsity=0.8)
    assert "features.0.weight" not in masks.masks
    assert abs(masks.sparsity() - 0.8) < 1e-3


def test_giving_q_means_the_per_layer_rule_with_no_target():
    """Options own their rules: q implies rule=layer-std (the method declares it), in Python as in the CLI's --q."""
    model = _digits_model()
    expected = magnitude_masks(copy.deepcopy(model), rule="layer-std", q=0.7).sparsity()
    res = pk.prune(model, "magnitude", torch.randn(1, 1, 8, 8), q=0.7)
    assert res.target["rule"] == "layer-std" and res.info["sparsity"] == pytest.approx(expected)
    with pytest.raises(PrunekitError, match="needs a sparsity target"):
        pk.prune(_digits_model(), "magnitude", torch.randn(1, 1, 8, 8))


def test_ignored_layers_and_classifier_option():
    model = _digits_model()
    x = torch.randn(2, 1, 8, 8)
    first = model.features[0].weight.detach().clone()
    pk.prune(model, "magnitude", x, sparsity=0.9, ignored_layers=["features.0"], include_classifier=False)
    assert torch.equal(model.features[0].weight, first)
    assert bool((model.linear.weight != 0).all())
    assert (model.features[3].weight == 0).any()
    with pytest.raises(PrunekitError, match="not a module"):
        pk.prune(model, "magnitude", x, sparsity=0.5, ignored_layers=["nope"])
    with pytest.raises(PrunekitError, match="rule"):
        pk.prune(model, "magnitude", x, sparsity=0.5, rule="median")
    with pytest.raises(PrunekitError, match="sparsity"):
        pk.prune(model, "magnitude", x)


def test_iterative_schedule_keeps_pruned_weights_zero_through_sgd_with_momentum_and_decay(digits):
    train_loader, test_loader = digits
    model = _digits_model()
    cfg = TrainConfig(epochs=1, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3, batch_size=64)
    zeros_seen = []

    def retrain(m: nn.Module, masks, step: int) -> dict:
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        m, res = fit(m, train_loader, test_loader, cfg, device="cpu", after_step=masks.after_step)
        params = dict(m.named_parameters())
        for name, mask in masks.masks.items():
            assert bool((params[name][~mask] == 0).all()), f"{name}: a pruned weight came back"
            assert not torch.equal(params[name][mask], before[name][mask])  # the survivors did train
        zeros_seen.append(sum(int((~mk).sum()) for mk in masks.masks.values()))
        return {"top1": res.final["val_top1"]}

    history = iterative_prune(model, torch.zeros(1, 1, 8, 8), schedule=(0.5, 0.8), retrain=retrain)
    assert [h["sparsity_target"] for h in history] == [0.5, 0.8]
    assert all(abs(h["sparsity"] - h["sparsity_target"]) < 1e-3 for h in history)
    assert history[1]["nonzero_params"] < history[0]["nonzero_params"]
    assert history[-1]["top1"] > 30.0  # well above chance (10 %): the masked network still learns
    assert zeros_seen[1] > zeros_seen[0]
    with pytest.raises(PrunekitError, match="increasing"):
        iterative_prune(model, torch.zeros(1, 1, 8, 8), schedule=(0.8, 0.5))


def test_without_masks_momentum_and_decay_would_revive_weights():
    """Control for the test above: an unmasked SGD step does move pruned weights off zero."""
    model = _digits_model()
    pk.prune(model, "magnitude", torch.zeros(1, 1, 8, 8), sparsity=0.8)
    masks = Masks.from_zeros(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    assert any(bool((params[n][~m] != 0).any()) for n, m in masks.masks.items())


def test_masks_from_zeros_recovers_the_pattern():
    model = _digits_model()
    pk.prune(model, "magnitude", torch.zeros(1, 1, 8, 8), sparsity=0.75)
    masks = Masks.from_zeros(model)
    assert set(masks.masks) == {f"{n}.weight" for n in prunable_layers(model)}
    assert abs(masks.sparsity() - 0.75) < 1e-3


def test_sensitivity_scan_picks_q_per_layer_and_restores_weights(digits):
    train_loader, test_loader = digits
    model = _digits_model()
    model, _ = fit(model, train_loader, None, TrainConfig(epochs=1, lr=0.1, batch_size=64), device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qs = (0.5, 1.0, 3.0)
    chosen = sensitivity_scan(model, lambda m: evaluate(m, test_loader)["top1"], qs=qs, tolerance=2.0)
    assert set(chosen) == set(prunable_layers(model))
    assert set(chosen.values()) <= {0.0, *qs}
    assert min(chosen.values()) < 3.0  # q = 3 (≈ 99.7 % of a layer) costs more than 2 points somewhere
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    masks = magnitude_masks(model, rule="layer-std", q=chosen)
    assert 0.0 < masks.sparsity() < 1.0
