"""Surgery is exact where the maths says it must be: zero channels, zero residual branches, folds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.blocks import find_blocks, remove_block
from prunekit.compensate import fold_constant_into, merge_input_channel
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.masks import Masks


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn", "googlenet", "mobilenet_v2", "tv:regnet_x_400mf",
                                  "tv:shufflenet_v2_x0_5", "tv:swin_t"])  # channel shuffle; channel-last windows
def test_removing_zeroed_channels_keeps_output(name):
    torch.manual_seed(0)
    model = pk.models.create(name).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    pg = PruneGraph(model, x[:1])
    g = torch.Generator().manual_seed(1)
    remove = {}
    for grp in pg.groups:  # a random third of each group (the same positions in every block of a grouped conv)
        per = grp.size // grp.chunks
        pos = torch.randperm(per, generator=g)[: max(1, per // 3)].tolist()
        remove[grp.index] = [p + c * per for c in range(grp.chunks) for p in pos]
    pg.zero_channels(remove)
    with torch.no_grad():
        masked = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    pg.apply(remove)
    with torch.no_grad():
        pruned = model(x)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * params_before
    assert torch.allclose(masked, pruned, atol=1e-5, rtol=1e-4), (masked - pruned).abs().max()


def test_residual_blocks_found_and_removed_exactly():
    model = pk.models.create("resnet20").eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    blocks = find_blocks(model, x)
    # 9 blocks, 2 of which change shape (stride-2, wider): 7 removable
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2",
                                        "layer3.1", "layer3.2"]
    assert blocks[3].closing_bn == "layer2.1.bn2"
    bn = model.get_submodule(blocks[3].closing_bn)
    bn.weight.data.zero_()
    bn.bias.data.zero_()
    with torch.no_grad():
        ref = model(x)
    remove_block(model, blocks[3])
    assert isinstance(model.layer2[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_blocks_found_in_torchvision_mobilenet():
    model = pk.models.create("tv:mobilenet_v2").eval()
    blocks = find_blocks(model, torch.randn(1, 3, 64, 64))
    assert len(blocks) == 10  # inverted residuals with stride 1 and equal widths


def test_group_options_min_keep_round_to_and_ignore():
    model = pk.models.create("resnet20")
    x = torch.randn(1, 3, 32, 32)
    pg = PruneGraph(model, x, min_keep=4, round_to=4, ignored_layers=["layer1.0.conv1"])
    assert all(g.name != "layer1.0.conv1" for g in pg.groups)
    g = pg.groups[0]
    assert pg.clamp_keep(g, 1) == 4 and pg.clamp_keep(g, 5) == 8
    with pytest.raises(PrunekitError, match="not a module"):
        PruneGraph(model, x, ignored_layers=["nope"])


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.a(x) if x.mean() > 0 else self.b(x)  # data-dependent control flow
        return self.fc(y.mean((2, 3)))


class _HardReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.conv(x), 4)
        return self.head(y.reshape(y.shape[0], 16 * 4 * 4))  # hard-coded width


def test_untraceable_models_get_a_clear_error():
    with pytest.raises(PrunekitError, match="'b'.*never ran"):
        PruneGraph(_Branchy(), torch.ones(1, 3, 8, 8))
    pg = PruneGraph(_HardReshape(), torch.ones(1, 3, 8, 8))
    with pytest.raises(PrunekitError, match="'_HardReshape' just after module 'conv'"):
        pg.apply({0: [0, 1, 2, 3]})


def test_fold_constant_into_bias_and_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 1)
    x = torch.randn(2, 4, 6, 6)
    x[:, 1] = 0.7  # channel 1 is a constant map
    ref = conv(x)
    fold_constant_into(conv, [1], torch.tensor([0.7]))
    conv.weight.data[:, 1] = 0
    x2 = x.clone()
    x2[:, 1] = 0
    assert torch.allclose(conv(x2), ref, atol=1e-6)
    conv2, bn = nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5).eval()
    bn.running_mean.uniform_()
    ref = bn(conv2(x))
    fold_constant_into(conv2, [1], torch.tensor([0.7]), bn=bn)
    conv2.weight.data[:, 1] = 0
    assert torch.allclose(bn(conv2(x2)), ref, atol=1e-5)


def test_merge_input_channel_is_exact_for_linear_relation():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 5, 5)
    x[:, 2] = 1.5 * x[:, 0]  # channel 2 is a scaled copy of channel 0
    ref = conv(x)
    merge_input_channel(conv, src=2, dst=0, scale=1.5)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    assert conv.weight[:, 2].abs().sum() == 0


def test_masks_survive_momentum_and_weight_decay():
    torch.manual_seed(0)
    lin = nn.Linear(20, 5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):  # build up momentum on every weight first
        lin(torch.randn(8, 20)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    mask = (torch.rand(5, 20) > 0.5).float()
    masks = Masks({"weight": mask})
    masks.attach(lin)
    for _ in range(3):
        lin(torch.randn(8, 20)).square().sum().backward()
        opt.step()
        masks.after_step(lin)
        opt.zero_grad()
    assert torch.all(lin.weight[mask == 0] == 0)
    assert abs(masks.sparsity() - (1 - mask.mean().item())) < 1e-6


def test_frozen_parameters_stay_frozen_after_pruning(tmp_path):
    """Torch-Pruning makes new Parameters that require grad; the option-A shortcut's fixed selection stays frozen,
    so a fine-tune sees the same trainable parameters in the process that pruned and after loading the file."""
    model = pk.models.create("resnet20")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"layer2.0.shortcut.weight", "layer3.0.shortcut.weight"}
    pk.prune(model, "l1-norm", torch.randn(2, 3, 32, 32), speedup=2.0)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    pk.save(model, tmp_path / "m.pt")
    assert {n for n, p in pk.load(tmp_path / "m.pt").named_parameters() if not p.requires_grad} == frozen
