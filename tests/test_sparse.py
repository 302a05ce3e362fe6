"""Compressed sparse storage: the 8-bit gap CSR codec, exact export/load, sizes, bad files, torch.sparse path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.sparse import decode_csr, encode_csr, export_sparse, load_sparse, sparse_latency


def test_gap_encoding_pads_long_gaps_and_keeps_empty_rows():
    m = torch.zeros(5, 900)
    m[1, 0], m[1, 255], m[1, 256], m[1, 511], m[1, 850] = 1.0, 2.0, 3.0, 4.0, 5.0  # row 0 is empty
    m[3, 510] = 6.0  # distance 511 from column -1: two paddings; rows 2 and 4 are empty
    values, gaps, rowptr = encode_csr(m)
    assert gaps.dtype == torch.uint8 and rowptr.tolist() == [0, 0, 6, 6, 9, 9]
    # row 1: distances 1, 255, 1, 255, 339 -> the last one needs a padding zero (gap 255) then gap 84
    assert gaps[:6].tolist() == [1, 255, 1, 255, 255, 84]
    assert values[:6].tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 5.0]
    assert gaps[6:].tolist() == [255, 255, 1] and values[6:].tolist() == [0.0, 0.0, 6.0]
    assert torch.equal(decode_csr(values, gaps, rowptr, 900), m)


def test_gap_encoding_exact_boundaries_and_empty_matrix():
    m = torch.zeros(1, 600)
    m[0, 254] = 1.0  # distance 255: fits, no padding
    m[0, 510] = 2.0  # distance 256: one padding entry
    values, gaps, _ = encode_csr(m)
    assert gaps.tolist() == [255, 255, 1] and values.tolist() == [1.0, 0.0, 2.0]
    empty = torch.zeros(3, 4)
    v, g, r = encode_csr(empty)
    assert v.numel() == g.numel() == 0 and r.tolist() == [0, 0, 0, 0]
    assert torch.equal(decode_csr(v, g, r, 4), empty)


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3, 1.0])
def test_gap_encoding_round_trips_random_matrices(density):
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(37, 1500, generator=gen) * (torch.rand(37, 1500, generator=gen) < density)
    assert torch.equal(decode_csr(*encode_csr(m), 1500), m)
    v16 = encode_csr(m, torch.float16)
    assert torch.equal(decode_csr(*v16, 1500), m.half().float())


def test_corrupt_arrays_are_rejected():
    values, gaps, rowptr = encode_csr(torch.eye(4))
    with pytest.raises(PrunekitError, match="corrupt"):
        decode_csr(values, gaps, rowptr, 2)  # columns beyond the width
    with pytest.raises(PrunekitError, match="corrupt"):
        decode_csr(values[:-1], gaps[:-1], rowptr, 4)


@pytest.fixture(scope="module")
def pruned_googlenet():
    """GoogLeNet (cheap variant) at 90 % sparsity with non-trivial BN statistics, so outputs depend on weights."""
    torch.manual_seed(0)
    model = pk.models.create("googlenet", width_mult=0.25, stem_stride=2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.01, 0.05)
            m.bias.data.normal_(0, 0.1)
    x = torch.randn(4, 3, 32, 32)
    pk.prune(model, "magnitude", x, sparsity=0.9, rule="layer-std")
    return model.eval(), x


def test_export_load_identical_fp32_and_sizes(pruned_googlenet, tmp_path):
    model, x = pruned_googlenet
    sizes = export_sparse(model, tmp_path / "m.spk")
    loaded = load_sparse(tmp_path / "m.spk")
    ref = model(x)
    assert ref.std(0).max() > 1e-3  # outputs vary with the input: the check below is not vacuous
    assert torch.equal(loaded(x), ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert sizes["file_bytes"] == sizes["sparse_bytes"] < sizes["dense_bytes"] / 3
    assert sizes["sparse_gzip_bytes"] < sizes["sparse_bytes"]
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sizes["sparse_layers"] == len(layers)
    assert sizes["nonzero"] == sum(int((m.weight != 0).sum()) for m in layers)
    obj = torch.load(tmp_path / "m.spk", weights_only=True)
    assert obj["format"] == "prunekit-sparse" and obj["gaps"].dtype == torch.uint8


def test_fp16_and_gzip(pruned_googlenet, tmp_path):
    model, x = pruned_googlenet
    fp32 = export_sparse(model, tmp_path / "a.spk")
    fp16 = export_sparse(model, tmp_path / "b.spk", values="fp16", compress=True)
    assert fp16["sparse_bytes"] < fp32["sparse_bytes"]
    assert fp16["file_bytes"] < fp16["sparse_bytes"]  # the gzip container is what was written
    assert torch.load(tmp_path / "b.spk", weights_only=True)["compression"] == "gzip"
    loaded = load_sparse(tmp_path / "b.spk")
    for name, w in model.state_dict().items():
        back = loaded.state_dict()[name]
        assert back.dtype == w.dtype
        if name.endswith(".weight") and w.dim() > 1:
            assert torch.equal(back, w.half().float())  # exact to fp16 precision
        else:
            assert torch.equal(back, w)
    assert torch.allclose(loaded(x), model(x), rtol=1e-2, atol=1e-2)


def test_bad_files_give_clear_errors(pruned_googlenet, tmp_path):
    model, _ = pruned_googlenet
    junk = tmp_path / "junk.spk"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(PrunekitError, match="corrupt"):
        load_sparse(junk)
    pk.save(model, tmp_path / "dense.pt")
    with pytest.raises(PrunekitError, match="prunekit.load"):
        load_sparse(tmp_path / "dense.pt")
    export_sparse(model, tmp_path / "m.spk")
    obj = torch.load(tmp_path / "m.spk", weights_only=True)
    obj["gaps"][obj["layers"][0]["entries"] // 2] = 0
    torch.save(obj, tmp_path / "tampered.spk")
    with pytest.raises(PrunekitError, match="corrupt"):
        load_sparse(tmp_path / "tampered.spk")
    export_sparse(model, tmp_path / "z.spk", compress=True)
    obj = torch.load(tmp_path / "z.spk", weights_only=True)
    obj["payload"][100:200] = 7
    torch.save(obj, tmp_path / "z-bad.spk")
    with pytest.raises(PrunekitError, match="corrupt"):
        load_sparse(tmp_path / "z-bad.spk")
    with pytest.raises(PrunekitError, match="values"):
        export_sparse(model, tmp_path / "q.spk", values="int8")


def test_torch_sparse_paths_match_dense():
    torch.manual_seed(0)
    model = pk.models.create("digits_cnn", num_classes=10, in_channels=1)
    pk.prune(model, "magnitude", torch.zeros(1, 1, 8, 8), sparsity=0.9, rule="layer-std")
    lat = sparse_latency(model, torch.randn(8, 1, 8, 8), repeats=2, warmup=1)
    assert set(lat) == {"dense", "sparse_linear", "sparse_conv_linear"}
    assert lat["sparse_linear"]["max_abs_diff"] < 1e-4 and lat["sparse_conv_linear"]["max_abs_diff"] < 1e-4
    assert all(v["median_ms"] > 0 for v in lat.values())


class _TokensAndUpsampling(nn.Module):
    """Embedding and transposed-conv weights, which magnitude pruning and the sparse file cover too."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens):
        e = self.embed(tokens).mean(1)[:, :, None, None].expand(-1, -1, 2, 2)
        return self.head(self.up(e).mean((2, 3)))


def test_magnitude_prunes_embeddings_and_transposed_convs_and_stores_them_sparse(tmp_path):
    torch.manual_seed(0)
    model = _TokensAndUpsampling().eval()
    tokens = torch.randint(0, 50, (4, 7))
    pk.prune(model, "magnitude", tokens, rule="layer-std")  # per layer: the embedding's scale is not the conv's
    for layer in (model.embed, model.up):
        assert 0.2 < (layer.weight == 0).float().mean() < 0.95
    sizes = export_sparse(model, tmp_path / "m.spk")
    assert sizes["sparse_layers"] == 3
    loaded = load_sparse(tmp_path / "m.spk", model=_TokensAndUpsampling())
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
