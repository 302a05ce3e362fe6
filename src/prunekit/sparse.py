"""Compressed sparse storage and inference for unstructured-pruned models.

Zeros in a dense tensor cost as much disk as any other value, so a pruned model only shrinks
when its weights are stored sparsely (Han et al. 2016, "Deep Compression", §2). Each conv or
linear weight is viewed as a matrix (rows = output channels, columns = in·kh·kw) and stored
as CSR whose column indices are *relative gaps* of 8 bits: a gap is the distance to the
previous stored column of the row (the first counts from column -1), so 1..255; a longer
distance inserts a padding entry (value 0, gap 255). A weight goes into CSR when that is
smaller than storing it as it is; biases, BN parameters and buffers are stored as they are.
The CSR arrays of all layers are concatenated into three tensors, so the per-tensor overhead
of the container does not eat the saving.

The file is a ``torch.save`` dict of tensors, ints, strings and lists, so ``torch.load(...,
weights_only=True)`` reads it and no pickled code runs; with ``compress=True`` that stream is
gzipped and held as one uint8 tensor in the same kind of dict. The architecture recipe is
``io.arch_of``'s, so ``load_sparse`` rebuilds the dense model with ``io.build``.

Dense kernels gain nothing from zeros; ``sparse_latency`` measures the masked dense model
beside a ``torch.sparse`` CSR path so that reports show what sparsity really buys at inference.
"""

from __future__ import annotations

import copy
import gzip
import io as _io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .errors import PrunekitError
from .measure import WEIGHTED, hooked, latency, size_bytes

FORMAT = "prunekit-sparse"
VERSION = 1
MAX_GAP = 255
_VALUES = {"fp32": torch.float32, "fp16": torch.float16}


def encode_csr(matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(values, uint8 gaps, int32 row pointers) of a 2-D tensor, with padding entries for long gaps."""
    rows, cols = matrix.nonzero(as_tuple=True)  # row-major order
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    prev = cols.roll(1)
    prev[first] = -1
    dist = cols - prev
    pads = (dist - 1) // MAX_GAP  # padding entries needed before each real entry
    per = pads + 1
    pos = per.cumsum(0) - 1  # where each real entry lands after its paddings
    n = int(per.sum())
    gaps = torch.full((n,), MAX_GAP, dtype=torch.uint8)
    values = torch.zeros(n, dtype=dtype)
    gaps[pos] = (dist - MAX_GAP * pads).to(torch.uint8)
    values[pos] = matrix[rows, cols].to(dtype)
    row_entries = torch.zeros(matrix.shape[0], dtype=torch.int64).index_add_(0, rows, per)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), row_entries.cumsum(0)]).to(torch.int32)
    return values, gaps, rowptr


def decode_csr(values: torch.Tensor, gaps: torch.Tensor, rowptr: torch.Tensor, ncols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``(len(rowptr) - 1, ncols)`` matrix of ``encode_csr``'s arrays; checks them first."""
    if rowptr.numel() == 0:
        raise PrunekitError("sparse weights are corrupt (no row pointers); re-export the model")
    rowptr = rowptr.long()
    nrows = rowptr.numel() - 1
    counts = rowptr.diff()
    if (int(rowptr[0]) != 0 or bool((counts < 0).any()) or int(rowptr[-1]) != gaps.numel()
            or values.numel() != gaps.numel() or bool((gaps == 0).any())):
        raise PrunekitError("sparse weights are corrupt (row pointers and gaps disagree); re-export the model")
    rows = torch.repeat_interleave(torch.arange(nrows), counts)
    csum = gaps.long().cumsum(0)
    start = torch.cat([torch.zeros(1, dtype=torch.int64), csum])[rowptr[:-1]]
    cols = csum - start[rows] - 1
    if cols.numel() and int(cols.max()) >= ncols:
        raise PrunekitError("sparse weights are corrupt (a column index exceeds the layer width); re-export the model")
    dense = torch.zeros(nrows * ncols, dtype=dtype)
    dense[rows * ncols + cols] = values.to(dtype)
    return dense.view(nrows, ncols)


def _encoded_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, WEIGHTED)}


def export_sparse(model: nn.Module, path: str | Path, *, values: str = "fp32",
                  compress: bool = False) -> dict[str, Any]:
    """Write ``model`` as CSR with 8-bit gaps (atomically) and return its sizes next to the dense fp32 size.

    Returns ``dense_bytes`` (``measure.size_bytes``), ``sparse_bytes`` and ``sparse_gzip_bytes`` (the
    plain and the gzipped stream, both measured whichever ``compress`` writes), ``file_bytes`` (what is
    on disk), and the counts of stored, non-zero and padding entries.
    """
    if values not in _VALUES:
        raise PrunekitError(f"values must be one of {', '.join(_VALUES)}, got {values!r}")
    vdtype = _VALUES[values]
    vbytes = torch.finfo(vdtype).bits // 8
    dense: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    blobs: dict[str, list[torch.Tensor]] = {"values": [torch.zeros(0, dtype=vdtype)],
                                            "gaps": [torch.zeros(0, dtype=torch.uint8)],
                                            "rowptr": [torch.zeros(0, dtype=torch.int32)]}
    entries = nonzero = 0
    encodable = _encoded_weights(model)
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name in encodable and t.is_floating_point() and t.dim() >= 2:
            vals, gaps, rowptr = encode_csr(t.reshape(t.shape[0], -1), vdtype)
            if vals.numel() * (vbytes + 1) + rowptr.numel() * 4 < t.numel() * t.element_size():
                layers.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                               "entries": vals.numel()})
                for key, blob in zip(blobs, (vals, gaps, rowptr), strict=True):
                    blobs[key].append(blob)
                entries += vals.numel()
                nonzero += int((t != 0).sum())
                continue
        dense[name] = t
    record = {"format": FORMAT, "version": VERSION, "arch": io.arch_of(model), "values": values, "dense": dense,
              "layers": layers, **{k: torch.cat(v) for k, v in blobs.items()}}
    buf = _io.BytesIO()
    torch.save(record, buf)
    raw = buf.getvalue()
    packed = gzip.compress(raw, compresslevel=9, mtime=0)
    if compress:
        io.atomic_save({"format": FORMAT, "version": VERSION, "compression": "gzip",
                        "payload": torch.frombuffer(bytearray(packed), dtype=torch.uint8)}, path)
    else:
        io.atomic_save(record, path)
    return {"path": str(path), "values": values, "compress": compress, "dense_bytes": size_bytes(model),
            "sparse_bytes": len(raw), "sparse_gzip_bytes": len(packed), "file_bytes": Path(path).stat().st_size,
            "sparse_layers": len(layers), "entries": entries, "nonzero": nonzero, "padding": entries - nonzero}


def _read(path: str | Path) -> dict:
    obj = io.safe_load(path)
    if obj.get("format") != FORMAT:
        hint = "; load it with prunekit.load" if obj.get("format") == io.FORMAT else ""
        raise PrunekitError(f"{path} is not a prunekit sparse file (format {obj.get('format')!r}){hint}")
    if int(obj.get("version", 0)) > VERSION:
        raise PrunekitError(f"{path} was written by a newer prunekit (sparse format {obj['version']}); "
                            "upgrade prunekit")
    if obj.get("compression") == "gzip":
        try:
            raw = gzip.decompress(obj["payload"].numpy().tobytes())
            obj = torch.load(_io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # gzip, zlib and torch.load raise many types for damaged data
            raise PrunekitError(f"{path} is corrupt (its gzip payload does not unpack: {exc}); re-export it") from exc
    needed = ("arch", "dense", "layers", "values", "gaps", "rowptr")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or any(k not in obj for k in needed):
        raise PrunekitError(f"{path} is corrupt (sparse record incomplete); re-export it")
    return obj


def load_sparse(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the dense model (in eval mode) from a file written by ``export_sparse`` (``model``: see io.build)."""
    obj = _read(path)
    state = dict(obj["dense"])
    start = row = 0
    try:
        for layer in obj["layers"]:
            shape, n = layer["shape"], layer["entries"]
            matrix = decode_csr(obj["values"][start:start + n], obj["gaps"][start:start + n],
                                obj["rowptr"][row:row + shape[0] + 1], math.prod(shape[1:]),
                                getattr(torch, layer["dtype"]))
            state[layer["name"]] = matrix.view(shape)
            start, row = start + n, row + shape[0] + 1
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
        raise PrunekitError(f"{path} is corrupt (bad layer table: {exc}); re-export it") from exc
    if start != obj["values"].numel() or row != obj["rowptr"].numel():
        raise PrunekitError(f"{path} is corrupt (layer table and sparse arrays disagree); re-export it")
    model = io.build(obj["arch"], state, model)
    model.eval()
    return model


io.DECODERS[FORMAT] = load_sparse


class SparseLinear(nn.Module):
    """``nn.Linear`` computed as a CSR × dense product (``torch.sparse.mm``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (groups=1) as im2col (``F.unfold``) followed by a CSR × dense product."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight_csr = conv.weight.detach().reshape(conv.out_channels, -1).to_sparse_csr()
        self.bias = None if conv.bias is None else conv.bias.detach().view(1, -1, 1, 1)
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (b, c·kh·kw, L)
        out = torch.sparse.mm(self.weight_csr, cols.transpose(0, 1).reshape(cols.shape[1], -1))
        oh, ow = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                  zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride, strict=True))
        out = out.reshape(-1, b, oh, ow).transpose(0, 1)
        return out if self.bias is None else out + self.bias


def to_torch_sparse(model: nn.Module, *, convs: bool = False) -> nn.Module:
    """An inference copy whose Linear (and, with ``convs``, plain zero-padded Conv2d) layers run as CSR."""
    sparse = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # torch flags CSR as beta on every conversion
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for name, m in list(sparse.named_modules()):
            if isinstance(m, nn.Linear):
                new: nn.Module = SparseLinear(m)
            elif (convs and isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                  and not isinstance(m.padding, str)):
                new = SparseConv2d(m)
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(sparse.get_submodule(parent) if parent else sparse, leaf, new)
    return sparse


@torch.no_grad()
def sparse_latency(model: nn.Module, example_input: torch.Tensor, *, repeats: int = 30, warmup: int = 5,
                   threads: int | None = None) -> dict[str, Any]:
    """Latency of the masked dense model, of CSR linear layers, and of CSR conv + linear layers.

    Each sparse variant also reports its largest output deviation from the dense model, so a fast
    but wrong path cannot go unnoticed.
    """
    with hooked(model):
        ref = model(example_input)
    result: dict[str, Any] = {"dense": latency(model, example_input, repeats=repeats, warmup=warmup, threads=threads)}
    for key, convs in (("sparse_linear", False), ("sparse_conv_linear", True)):
        sparse = to_torch_sparse(model, convs=convs)
        result[key] = latency(sparse, example_input, repeats=repeats, warmup=warmup, threads=threads)
        result[key]["max_abs_diff"] = float((sparse(example_input) - ref).abs().max())
    return result
