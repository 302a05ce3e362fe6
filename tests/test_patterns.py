"""Any traceable model: pruned exactly (every output keeps its shape, the speedup holds by an independent
count, the file round-trips) or refused with one clear error and the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.graph import flat_tensors
from prunekit.measure import count_macs


def cbr(i: int, o: int, k: int = 3, groups: int = 1, bn: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=not bn)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(o)] if bn else []), nn.ReLU())


class TwoHeads(nn.Module):
    """Several outputs: a classifier and a dense map (a detector-like tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 32), cbr(32, 24))
        self.dense = nn.Conv2d(24, 4, 1)
        self.fc = nn.Linear(24, 7)

    def forward(self, x):
        f = self.body(x)
        return self.fc(f.mean((2, 3))), self.dense(f)


class DictOut(TwoHeads):
    def forward(self, x):
        logits, dense = super().forward(x)
        return {"logits": logits, "boxes": dense}


class ConcatBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a, self.b = cbr(16, 8), cbr(16, 12, 1)
        self.mix = cbr(20, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        s = self.stem(x)
        return self.fc(self.mix(torch.cat([self.a(s), self.b(s)], 1)).mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 32), nn.MaxPool2d(2), cbr(32, 48), nn.AdaptiveAvgPool2d(2))
        self.fc1, self.fc2 = nn.Linear(192, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.body(x).flatten(1))))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 32), cbr(32, 32, groups=32), cbr(32, 64, 1), cbr(64, 64, groups=4))
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class InplaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.block = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)
        self.unused = nn.Parameter(torch.zeros(3))  # never used in forward

    def forward(self, x):
        s = self.stem(x)
        y = self.block(s)
        y += s  # in-place residual
        return self.fc(torch.relu_(y).mean((2, 3)))


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16, bn=False), cbr(16, 24, bn=False))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class Chunked(nn.Module):
    """C2f-like: a conv whose output is split by chunk, both halves used."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = cbr(3, 32, 1)
        self.m = cbr(16, 16)
        self.cv2 = cbr(48, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.fc(self.cv2(torch.cat([a, b, self.m(b)], 1)).mean((2, 3)))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = cbr(3, 32)  # 32 wide: fine enough steps for every method to land within 3 % of 1.5x
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 32, 2, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.out = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        return self.out(self.up(nn.functional.max_pool2d(self.down(x), 2)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc((t + self.mlp(t)).mean(1))


class SelfAttention(nn.Module):
    """Attention written by hand: its forward views the qkv channels as (heads, dims) with fixed sizes."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, t):
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / self.head_dim ** 0.5).softmax(-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class HandAttention(Attention):
    """Hand-written attention keeps its widths; the feed-forward hidden layer still prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        return self.fc((t + self.mlp(t)).mean(1))


class FunctionalLinear(nn.Module):
    """A layer whose weights are used through F.linear (as torchvision's Swin does): what touches it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 32), cbr(32, 24))  # the 32-wide group prunes; the 24 feed F.linear
        self.proj = nn.Linear(24, 24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.relu(nn.functional.linear(self.body(x).mean((2, 3)), self.proj.weight, self.proj.bias)))


class ShuffleBlock(nn.Module):
    """ShuffleNet's unit: a bottleneck whose output channels are shuffled between two groups. The shuffle's
    channels stay; the bottleneck prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.proj = cbr(16, 32), cbr(32, 16, groups=2)

    def forward(self, x):
        y = self.proj(self.conv(x))
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = cbr(3, 16), ShuffleBlock(), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class PixelShuffle(nn.Module):
    """Sub-pixel upsampling: the channels feeding nn.PixelShuffle stay (r² of them make one), the rest prune."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.up = cbr(3, 32), cbr(32, 64), nn.PixelShuffle(2)
        self.c, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.c(self.up(self.b(self.a(x)))).mean((2, 3)))


PATTERNS = [TwoHeads, DictOut, ConcatBranches, FlattenLinear, Depthwise, InplaceResidual, NoBatchNorm, Chunked,
            Transposed, Attention, HandAttention, FunctionalLinear, Shuffle, PixelShuffle]
STRUCTURED = ["l1-norm", "l2-norm", "fpgm", "net-slim", "random", "dist-fit", "tp-group-norm"]
# What must prune (not merely be refused cleanly), with the methods that may still refuse it by name.
MUST_PRUNE = {TwoHeads: (), DictOut: (), ConcatBranches: (), FlattenLinear: (), InplaceResidual: (),
              NoBatchNorm: ("net-slim",), Depthwise: ("fpgm",),  # Torch-Pruning's FPGM fails on grouped convs
              Transposed: (), Attention: ("net-slim",), HandAttention: ("net-slim",), FunctionalLinear: (),
              Shuffle: ("fpgm",), PixelShuffle: ()}  # Shuffle: a grouped conv again


def _varied(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    return model.eval()


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("cls", PATTERNS, ids=lambda c: c.__name__)
def test_pruned_exactly_or_refused_with_the_model_untouched(cls, method, tmp_path):
    model = _varied(cls)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        shapes = [t.shape for t in flat_tensors(model(x))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base_macs = count_macs(model, x[:1])
    try:
        result = pk.prune(model, method, x[:1], speedup=1.5)
    except PrunekitError as exc:
        assert method in MUST_PRUNE.get(cls, (method,)), str(exc)
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
        if method == "net-slim" and cls is NoBatchNorm:
            assert "no BatchNorm" in str(exc)
        return
    with torch.no_grad():
        out = result.model(x)
    assert [t.shape for t in flat_tensors(out)] == shapes
    assert abs(base_macs / count_macs(result.model, x[:1]) - 1.5) <= 0.03 * 1.5
    pk.save(result.model, tmp_path / "m.pt")
    back = pk.load(tmp_path / "m.pt", model=cls())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(flat_tensors(back(x)), flat_tensors(out), strict=True))


def test_every_output_layer_is_protected():
    from prunekit.graph import PruneGraph

    pg = PruneGraph(_varied(TwoHeads), torch.randn(1, 3, 16, 16))
    assert set(pg.heads) == {"fc", "dense"}
    pg = PruneGraph(_varied(ConcatBranches), torch.randn(1, 3, 16, 16))
    assert pg.heads == ["fc"]


def test_adaptive_slim_without_batchnorm_says_so():
    model = _varied(NoBatchNorm)
    with pytest.raises(PrunekitError, match="no BatchNorm"):
        pk.prune(model, "adaptive-slim", torch.randn(1, 3, 16, 16))


def test_attention_keeps_equal_head_dims_and_reloads(tmp_path):
    model = _varied(Attention)
    result = pk.prune(model, "l1-norm", torch.randn(1, 3, 16, 16), speedup=1.5)
    attn = result.model.attn
    assert attn.num_heads == 2 and attn.embed_dim < 32 and attn.head_dim * attn.num_heads == attn.embed_dim
    pk.save(result.model, tmp_path / "m.pt")
    back = pk.load(tmp_path / "m.pt", model=Attention()).attn
    assert (back.embed_dim, back.head_dim, back.in_proj_weight.shape) == (attn.embed_dim, attn.head_dim,
                                                                         attn.in_proj_weight.shape)


def test_hand_written_attention_and_functional_weights_are_protected_by_name():
    from prunekit.graph import PruneGraph

    x = torch.randn(1, 3, 16, 16)
    assert {"attn.qkv", "attn.proj"} <= set(PruneGraph(_varied(HandAttention), x).protected)
    assert "proj" in PruneGraph(_varied(FunctionalLinear), x).protected


class TwoInputs(nn.Module):
    """A model of two inputs (an image and a vector), called as model(image, vector)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.vec, self.fc = nn.Sequential(cbr(3, 32), cbr(32, 32)), nn.Linear(6, 32), nn.Linear(64, 5)

    def forward(self, image, vector):
        return self.fc(torch.cat([self.body(image).mean((2, 3)), torch.relu(self.vec(vector))], 1))


def test_several_example_inputs_prune_exactly_or_refuse_untouched(tmp_path):
    model = _varied(TwoInputs)
    inputs = (torch.randn(2, 3, 16, 16), torch.randn(2, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def macs(m: nn.Module) -> int:
        return count_macs(m, tuple(t[:1] for t in inputs), run=lambda mod, a: mod(*a))

    base = macs(model)
    with pytest.raises(PrunekitError, match="out of reach"):
        pk.prune(model, "l1-norm", inputs, speedup=1000.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    result = pk.prune(model, "l1-norm", tuple(t[:1] for t in inputs), speedup=1.5)
    assert result.model is model and model.body[1][0].out_channels < 32
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape == (2, 5) and abs(base / macs(model) - 1.5) <= 0.03 * 1.5
    pk.save(model, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path / "m.pt", model=TwoInputs())(*inputs), out)
