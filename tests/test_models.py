"""Model zoo: sizes match the published figures, shapes, option-A shortcut, errors, tracing."""

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from prunekit import models
from prunekit.errors import PrunekitError
from prunekit.models import PadShortcut

# (name, params in M, MACs in M). MACs as counted by Torch-Pruning's count_ops_and_params (conv + linear,
# plus its small BN/pool terms). Sources:
#   resnet*: He et al. 2016 (Table 6 params: 0.27M/0.46M/0.85M/1.7M); MACs as in the Torch-Pruning CIFAR
#            benchmarks (ResNet-56: 125.49M); the frozen option-A shortcut convs add ~2.5k params/0.26M MACs.
#   vgg16_bn: CIFAR VGG-16 as in Li et al. 2017 "Pruning Filters for Efficient ConvNets" (Table 1: 3.13e8
#            MACs); 14.7M params with the single Linear(512, 10) head.
#   googlenet: kuangliu/pytorch-cifar GoogLeNet, 6.2M params / 1.53G MACs (as in HRank, Lin et al. 2020).
#   mobilenet_v2: kuangliu/pytorch-cifar MobileNetV2 (ReLU, conv shortcuts) -- 2.30M params / 94.6M MACs,
#            measured once from this implementation, which follows models/mobilenetv2.py layer for layer.
PUBLISHED = [
    ("resnet20", 0.27, 41.0),
    ("resnet32", 0.46, 69.0),
    ("resnet56", 0.85, 125.5),
    ("resnet110", 1.7, 253.0),
    ("vgg16_bn", 14.7, 313.0),
    ("googlenet", 6.2, 1530.0),
    ("mobilenet_v2", 2.30, 94.6),
]


def _example(name: str) -> torch.Tensor:
    return torch.randn(1, *models.default_input_size(name))


def test_names_and_is_zoo() -> None:
    names = models.names()
    assert names == sorted(names)
    expected = {"resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "vgg19_bn", "googlenet"}
    assert expected | {"mobilenet_v2", "digits_cnn"} == set(names)
    assert models.is_zoo("resnet56")
    assert not models.is_zoo("tv:resnet18")
    assert models.default_input_size("digits_cnn") == (1, 8, 8)
    assert models.default_input_size("vgg16_bn") == (3, 32, 32)
    assert models.default_input_size("tv:resnet18") == (3, 224, 224)
    assert models.default_input_size("tv:inception_v3") == (3, 299, 299)


@pytest.mark.parametrize(("name", "params_m", "macs_m"), PUBLISHED)
def test_published_size(name: str, params_m: float, macs_m: float) -> None:
    model = models.create(name).eval()
    params = sum(p.numel() for p in model.parameters())
    macs, _ = tp.utils.count_ops_and_params(model, _example(name))
    assert params / 1e6 == pytest.approx(params_m, rel=0.02)
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.02)


@pytest.mark.parametrize("name", models.names())
def test_output_shapes(name: str) -> None:
    _, h, w = models.default_input_size(name)
    with torch.no_grad():
        assert models.create(name).eval()(_example(name)).shape == (1, 10)
        custom = models.create(name, num_classes=7, in_channels=1).eval()
        assert custom(torch.randn(1, 1, h, w)).shape == (1, 7)


def test_width_mult_and_stem_stride_cut_cost() -> None:
    x = _example("googlenet")
    full, _ = tp.utils.count_ops_and_params(models.create("googlenet"), x)
    strided, _ = tp.utils.count_ops_and_params(models.create("googlenet", stem_stride=2), x)
    thin = models.create("googlenet", width_mult=0.5, stem_stride=2).eval()
    assert strided / full == pytest.approx(0.25, rel=0.05)
    assert thin(x).shape == (1, 10)
    for name in ("vgg16_bn", "mobilenet_v2"):
        half = sum(p.numel() for p in models.create(name, width_mult=0.5).parameters())
        assert half < 0.35 * sum(p.numel() for p in models.create(name).parameters())


def test_option_a_shortcut_is_zero_padding() -> None:
    shortcut = PadShortcut(16, 32)
    assert not shortcut.weight.requires_grad
    x = torch.randn(2, 16, 9, 9)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))
    assert torch.equal(shortcut(x), expected)
    resnet = models.create("resnet20")
    assert isinstance(resnet.layer2[0].shortcut, PadShortcut)
    assert isinstance(resnet.layer3[0].shortcut, PadShortcut)


def test_pruned_shortcut_stays_a_frozen_selection() -> None:
    """Torch-Pruning swaps in a fresh Parameter (requires_grad=True); the shortcut must still not learn."""
    model = models.create("resnet20")
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[model.linear],
    )
    pruner.step()
    model(x).sum().backward()
    for shortcut, width in ((model.layer2[0].shortcut, 32), (model.layer3[0].shortcut, 64)):
        assert shortcut.out_channels < width
        weight = shortcut.weight[:, :, 0, 0]
        assert bool(((weight == 0) | (weight == 1)).all())
        assert weight.sum(0).max() <= 1 and weight.sum(1).max() <= 1
        assert shortcut.weight.grad is None


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn", "googlenet", "mobilenet_v2", "digits_cnn"])
def test_dependency_graph_builds(name: str) -> None:
    graph = tp.DependencyGraph().build_dependency(models.create(name), example_inputs=_example(name))
    assert len(list(graph.get_all_groups())) > 0


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(PrunekitError, match=r"unknown model 'xyz'.*resnet20.*tv:<torchvision name>") as err:
        models.create("xyz")
    assert "\n" not in str(err.value)
    with pytest.raises(PrunekitError, match=r"unknown torchvision model 'tv:resnet19'.*tv:resnet18"):
        models.create("tv:resnet19")
    with pytest.raises(PrunekitError, match="unknown model"):
        models.default_input_size("nope")


def test_bad_kwargs_name_the_allowed_ones() -> None:
    with pytest.raises(
        PrunekitError, match=r"'resnet20' does not take width_mult; allowed kwargs: in_channels"
    ):
        models.create("resnet20", width_mult=0.5)
    with pytest.raises(PrunekitError, match="in_channels, width_mult, stem_stride"):
        models.create("googlenet", depth=3)
    with pytest.raises(PrunekitError, match="stem_stride must be 1 or 2"):
        models.create("googlenet", stem_stride=4)
    with pytest.raises(PrunekitError, match="3-channel"):
        models.create("tv:resnet18", in_channels=1)


def test_torchvision_model_and_weights(tmp_path) -> None:
    model = models.create("tv:resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    loaded = models.create("tv:resnet18", num_classes=5, weights_path=str(path))
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    with pytest.raises(PrunekitError, match=r"classifier 'fc.weight'.*5 outputs but num_classes=7"):
        models.create("tv:resnet18", num_classes=7, weights_path=str(path))
    with pytest.raises(PrunekitError, match="not found"):
        models.create("tv:resnet18", weights_path=str(tmp_path / "missing.pt"))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PrunekitError, match="cannot read weights"):
        models.create("tv:resnet18", num_classes=5, weights_path=str(path))


def test_torchvision_aux_models_build_without_aux_heads() -> None:
    model = models.create("tv:googlenet", num_classes=3)
    assert model.aux1 is None
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
