"""Ultralytics detectors: offline import, building by name, exact traceable rewrite, pruning, save/load, ONNX, VOC data.

Every test runs with sockets guarded: a connection (or DNS lookup) to anything but loopback is
recorded and fails the test, here and in the fresh processes the tests start.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import pipeline
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.measure import count_macs

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: the import must happen offline, in prunekit
    pytest.skip("the yolo extra (ultralytics) is not installed", allow_module_level=True)

from prunekit import yolo  # noqa: E402  (does not import ultralytics by itself)
from prunekit.yolo.data import detection_data, voc_to_yolo  # noqa: E402

from .conftest import SHARED  # noqa: E402

BCCD = SHARED / "bccd"
X = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
STRUCTURED = ["l1-norm", "l2-norm", "fpgm", "net-slim", "random", "dist-fit"]
# Every method on the small yolov3-tinyu, l1-norm on yolov8n (10-35 s per prune here on 2 shared cores); yolo11n is
# pruned with l1-norm by the save/load test and channel-masked by test_pruned_equals_masked.
PRUNE_CASES = [("yolov3-tinyu", m) for m in STRUCTURED] + [("yolov8n", "l1-norm")]

# Installed in this process by the `offline` fixture and prepended to every script run in a fresh process.
GUARD = textwrap.dedent("""
    import socket
    NET_ATTEMPTS = []
    _LOCAL = {None, "localhost", "127.0.0.1", "::1", "0.0.0.0"}
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def _allowed(sock, address):
        return sock.family == getattr(socket, "AF_UNIX", None) or (isinstance(address, tuple) and address[0] in _LOCAL)

    def _guard_connect(sock, address):
        if not _allowed(sock, address):
            NET_ATTEMPTS.append(("connect", address))
            raise OSError(f"test guard: network access to {address!r}")
        return _connect(sock, address)

    def _guard_connect_ex(sock, address):
        if not _allowed(sock, address):
            NET_ATTEMPTS.append(("connect_ex", address))
            raise OSError(f"test guard: network access to {address!r}")
        return _connect_ex(sock, address)

    def _guard_getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL:
            NET_ATTEMPTS.append(("getaddrinfo", host))
            raise OSError(f"test guard: DNS lookup of {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = _guard_connect, _guard_connect_ex
    socket.getaddrinfo = _guard_getaddrinfo
""")


@pytest.fixture(scope="module")
def net_attempts(tmp_path_factory):
    """Guard sockets for the whole module (before Ultralytics is first imported); restored afterwards."""
    import socket

    saved = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    env = os.environ.get("PRUNEKIT_CACHE")
    os.environ["PRUNEKIT_CACHE"] = str(tmp_path_factory.mktemp("pk-yolo-cache"))  # fresh settings, no old fonts
    scope: dict = {}
    exec(GUARD, scope)
    yield scope["NET_ATTEMPTS"]
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved
    if env is None:
        os.environ.pop("PRUNEKIT_CACHE", None)
    else:
        os.environ["PRUNEKIT_CACHE"] = env


@pytest.fixture(autouse=True)
def offline(net_attempts):
    yield
    assert net_attempts == [], f"network access attempted: {net_attempts}"


def run_fresh(script: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter behind the socket guard; it fails if anything tried the network."""
    check = "\nassert NET_ATTEMPTS == [], NET_ATTEMPTS\nprint('NET-OK')\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(script) + check], capture_output=True,
                          text=True, cwd=tmp_path, timeout=timeout, env=env)
    assert proc.returncode == 0 and "NET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def outputs(model: nn.Module, x: torch.Tensor = X) -> list[torch.Tensor]:
    """The detector's results (not the neck feature maps Ultralytics also returns, which pruning may narrow)."""
    model.eval()
    with torch.no_grad():
        return yolo.predictions(model(x))


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from their defaults, so exactness tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model


_BASES: dict[str, nn.Module] = {}


def base(name: str) -> nn.Module:
    """One randomised ``ul:<name>`` per session (building costs seconds); tests prune deep copies."""
    if name not in _BASES:
        torch.manual_seed(0)
        _BASES[name] = randomise_bn(pk.models.create(f"ul:{name}", num_classes=3, imgsz=320)).eval()
    return copy.deepcopy(_BASES[name])


# ---- offline ----
def test_import_is_offline_and_settings_are_prunekits(tmp_path: Path) -> None:
    """In a fresh interpreter (other tests may have imported Ultralytics into this one already)."""
    run_fresh(f"""
        import os, sys
        from pathlib import Path
        os.environ["PRUNEKIT_CACHE"] = {str(tmp_path / "cache")!r}
        from prunekit import yolo
        assert "ultralytics" not in sys.modules  # prunekit does not import it on its own
        ul = yolo.ultralytics()
        from ultralytics import utils
        from ultralytics.utils import checks, events

        assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_CONFIG_DIR"] == str(yolo.config_dir())
        assert not utils.ONLINE and not utils.is_online() and not checks.AUTOINSTALL and not events.events.enabled
        assert ul.settings["sync"] is False and ul.settings["api_key"] == ""
        assert Path(ul.settings["runs_dir"]).is_relative_to(yolo.config_dir())
        assert Path(checks.check_font("Arial.ttf")).is_file()  # found locally, never downloaded
        assert yolo.ultralytics() is ul
    """, tmp_path)


# ---- building by name ----
def test_names_resolve_to_shipped_yamls() -> None:
    assert [(p.name, s) for p, s in map(yolo.resolve, ["ul:yolov8n", "yolo11s", "ul:yolov3u", "ul:yolov3-tinyu",
                                                       "ul:yolov5nu"])] == [
        ("yolov8.yaml", "n"), ("yolo11.yaml", "s"), ("yolov3.yaml", ""), ("yolov3-tiny.yaml", ""), ("yolov5.yaml", "n")]
    with pytest.raises(PrunekitError, match="did you mean 'ul:yolov8"):
        pk.models.create("ul:yolov8q", num_classes=3)
    with pytest.raises(PrunekitError, match="segment model"):
        pk.models.create("ul:yolov8n-seg", num_classes=3)
    with pytest.raises(PrunekitError, match="does not take in_channels"):
        pk.models.create("ul:yolov8n", num_classes=3, in_channels=1)
    with pytest.raises(PrunekitError, match="multiple of 32"):
        pk.models.create("ul:yolov8n", num_classes=3, imgsz=300)
    assert pk.models.default_input_size("ul:yolov8n") == (3, 640, 640)


def test_create_records_recipe_and_protected_layers() -> None:
    model = base("yolov8n")
    assert model.prunekit_arch == {"name": "ul:yolov8n", "num_classes": 3, "kwargs": {"imgsz": 320},
                                   "input_shape": [3, 320, 320]}
    head = model.model[-1]
    assert head.nc == 3 and len(yolo.head_layers(model)) == 2 * head.nl + 1  # box and class per level, DFL
    assert all(isinstance(m, nn.Conv2d) for m in yolo.head_layers(model))
    names = dict(model.named_modules())
    assert {names[n] for n in model.prunekit_protected} == set(yolo.protected_layers(model))


@pytest.mark.parametrize("name", ["yolov8n", "yolov8s", "yolo11n", "yolov3-tinyu", "yolov3u", "yolov5nu"])
def test_traceable_rewrite_is_exact(name: str) -> None:
    yolo.ultralytics()  # this test imports from Ultralytics itself: offline first, whichever test runs first
    from ultralytics.nn.modules.block import C2PSA, C2f

    torch.manual_seed(0)
    ref = randomise_bn(yolo.build_detection_model(f"ul:{name}", 3))
    new = yolo.make_traceable(copy.deepcopy(ref)).eval()
    assert not any(type(m).forward in (C2f.forward, C2PSA.forward) for m in new.modules())
    a, b = outputs(ref), outputs(new)
    assert [t.shape for t in a] == [t.shape for t in b]
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_weights_from_ultralytics_pickle_need_trust(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = randomise_bn(yolo.build_detection_model("ul:yolov3-tinyu", 3))
    torch.save({"model": trained, "epoch": 3}, tmp_path / "best.pt")  # what Ultralytics' trainer writes
    with pytest.raises(PrunekitError, match="pickle.*trust_pickle=True"):
        pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "best.pt")
    with pytest.raises(PrunekitError, match="predicts 3 classes but num_classes=5; pass num_classes=3"):
        pk.models.create("ul:yolov3-tinyu", num_classes=5, weights_path=tmp_path / "best.pt", trust_pickle=True)
    model = pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "best.pt", trust_pickle=True)
    assert "weights_path" not in model.prunekit_arch["kwargs"] and "trust_pickle" not in model.prunekit_arch["kwargs"]
    for p, q in zip(outputs(trained), outputs(model), strict=True):
        torch.testing.assert_close(q, p)
    torch.save(trained.state_dict(), tmp_path / "state.pt")  # a plain state dict needs no trust
    model = pk.models.create("ul:yolov3-tinyu", num_classes=3, weights_path=tmp_path / "state.pt")
    torch.testing.assert_close(outputs(model)[0], outputs(trained)[0])


# ---- pruning ----
def _shapes(ts: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in ts]


@pytest.mark.parametrize(("name", "method"), PRUNE_CASES)
def test_structured_methods_prune_detectors(name: str, method: str) -> None:
    model = base(name)
    before = outputs(model)
    protected = yolo.protected_layers(model)
    kept = [m.weight.detach().clone() for m in yolo.head_layers(model)]
    res = pk.prune(model, method, X, speedup=1.5, ignored_layers=protected)
    assert res.speedup == pytest.approx(1.5, rel=0.03)
    after = outputs(model)
    assert _shapes(after) == _shapes(before)
    for m, w in zip(yolo.head_layers(model), kept, strict=True):  # output channels untouched (inputs may shrink)
        assert m.out_channels == w.shape[0]


@pytest.mark.parametrize("name", ["yolov8n", "yolov3-tinyu"])  # with and without residual blocks
def test_adaptive_slim_removes_low_gamma_channels_and_blocks(name: str) -> None:
    model = base(name)
    before = outputs(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # what sparsity training leaves: a population of negligible BN scale factors
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                u = torch.rand(m.num_features, generator=g)
                m.weight.copy_(torch.where(u < 0.3, 1e-3 * torch.rand(m.num_features, generator=g), 0.5 + u))
        blocks = [f"model.{i}.m.0" for i, m in enumerate(model.model) if type(m).__name__ == "SplitC2f"
                  and type(m.m[0]).__name__ == "Bottleneck" and m.m[0].add][:2]
        for b in blocks:  # two residual blocks whose branch sparsity training silenced
            model.get_submodule(b).cv2.bn.weight.mul_(1e-3)
    # max_valley=1: the block learner's density-valley check cannot see a valley in six block scores
    res = pk.prune(model, "adaptive-slim", X, ignored_layers=yolo.protected_layers(model), max_valley=1.0)
    assert res.speedup > 1.2
    assert sorted(res.blocks_removed) == blocks  # yolov3-tinyu has no residual block
    assert _shapes(outputs(model)) == _shapes(before)


def test_adaptive_slim_removes_darknet_residual_blocks_of_yolov3u() -> None:
    """S0's layer pruning on the paper's architecture: silenced Darknet-53 bottlenecks become identities."""
    model = base("yolov3u")
    before = outputs(model)
    blocks = ["model.2", "model.6.1", "model.8.2"]  # one per stage: a single block and inside Sequentials
    with torch.no_grad():
        for b in blocks:
            model.get_submodule(b).cv2.bn.weight.mul_(1e-3)
    res = pk.prune(model, "adaptive-slim", X, channels=False, max_valley=1.0)
    assert sorted(res.blocks_removed) == blocks and res.speedup > 1.02
    after = outputs(model)
    assert _shapes(after) == _shapes(before)
    assert all(type(model.get_submodule(b)).__name__ != "Bottleneck" for b in blocks)


@pytest.mark.parametrize("name", ["yolo11n", "yolov3-tinyu"])  # yolov8n's C2f is yolo11n's C3k2 rewrite
def test_pruned_equals_masked(name: str) -> None:
    masked, pruned = base(name), base(name)
    pg_masked = PruneGraph(masked, X, ignored_layers=yolo.protected_layers(masked))
    pg_pruned = PruneGraph(pruned, X, ignored_layers=yolo.protected_layers(pruned))
    remove = {g.index: list(range(0, g.size, 3)) for g in pg_masked.groups}
    pg_masked.zero_channels(remove)
    pg_pruned.apply(remove)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    for p, q in zip(outputs(masked), outputs(pruned), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)


def test_pruned_detector_saves_loads_in_fresh_process_and_exports(tmp_path: Path) -> None:
    model = base("yolo11n")
    pk.prune(model, "l1-norm", X, speedup=1.5, ignored_layers=yolo.protected_layers(model))
    pk.save(model, tmp_path / "pruned.pt")
    torch.save({"x": X, "out": outputs(model)}, tmp_path / "ref.pt")
    run_fresh("""
        import sys, torch
        import prunekit as pk
        assert "ultralytics" not in sys.modules  # the core never imports the AGPL extra on its own
        model = pk.load("pruned.pt")
        ref = torch.load("ref.pt")
        with torch.no_grad():
            out = model(ref["x"])
        flat = [out[0], out[1]["boxes"], out[1]["scores"]]
        assert len(flat) == len(ref["out"])
        for a, b in zip(flat, ref["out"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    """, tmp_path)
    # ONNX wants one output tensor: the decoded predictions. export_onnx's absolute 1e-4 check is too tight for
    # boxes in pixels (float32 noise reaches 1.2e-4 at |y| ~ 160), so the same export is checked relatively here.
    from prunekit.runtimes.ort import session, to_onnx

    with yolo.export_mode(model):
        to_onnx(model, X, tmp_path / "pruned.onnx", 17)
        ref = outputs(model)[0]
    got = torch.from_numpy(session(tmp_path / "pruned.onnx").run(None, {"input": X.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert isinstance(model(X), tuple)  # the flag is restored afterwards


# ---- data ----
def _voc(root: Path, images: dict[str, tuple[tuple[int, int], list[tuple]] | None],
         splits: dict[str, list[str]]) -> Path:
    """A tiny VOC directory: per image id its (w, h) and objects (name, xmin, ymin, xmax, ymax[, difficult])."""
    from PIL import Image

    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, spec in images.items():
        size = spec[0] if spec else (64, 48)
        Image.new("RGB", size, (120, 30, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if spec is None:
            continue  # listed, but no annotation file at all
        objs = "".join(
            f"<object><name>{o[0]}</name><difficult>{int(len(o) > 5 and o[5])}</difficult><bndbox>"
            f"<xmin>{o[1]}</xmin><ymin>{o[2]}</ymin><xmax>{o[3]}</xmax><ymax>{o[4]}</ymax></bndbox></object>"
            for o in spec[1])
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>")
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _rows(want: list[list[float]]) -> list:
    """Label rows compared with pytest.approx per row (it does not take nested lists)."""
    return [pytest.approx(row, abs=1e-6) for row in want]


def _labels(data, split: str) -> dict[str, list[list[float]]]:
    folder = data.yaml.parent / "labels" / split
    return {f.stem: [[float(v) for v in ln.split()] for ln in f.read_text().splitlines()]
            for f in sorted(folder.glob("*.txt"))}


def test_voc_edge_cases(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc", {
        "a": ((100, 50), [("dog", 11, 6, 60, 30), ("cat", 1, 1, 100, 50)]),
        "b": ((100, 50), [("dog", 90, 40, 130, 70), ("dog", -5, 10, 20, 20)]),  # both reach outside: clipped
        "c": ((100, 50), [("cat", 30, 30, 30, 40), ("cat", 120, 10, 140, 20)]),  # zero width; wholly outside
        "d": ((100, 50), [("bird", 10, 10, 20, 20, True), ("cat", 10, 10, 20, 20)]),  # one difficult
        "e": ((100, 50), []),  # an image without objects
        "g": ((100, 50), [("dog", 10, 10, 30, 30), ("dog", 40, 10, 20, 30)]),  # the second has inverted corners
        "h": ((100, 50), [("fish", 10, 10, 30, 30)]),  # a class the training split does not have
    }, {"train": ["a", "b", "c", "d"], "val": ["e", "g", "h"]})
    with pytest.warns(UserWarning, match=r"2 boxes clipped.*\(e\.g\. b\.xml\).*2 boxes dropped with zero "
                                         r"area \(e\.g\. c\.xml\).*1 boxes dropped with inverted corners.*1 difficult.*"
                                         r"1 objects of classes the model does not have"):
        data = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert data.names == ["bird", "cat", "dog"]  # a class stays even where its only object is difficult; no fish
    assert (data.images, data.objects, data.empty_images) == ({"train": 4, "val": 3}, {"train": 5, "val": 1}, 3)
    train = _labels(data, "train")
    assert train["a"] == _rows([[2, 0.345, 0.34, 0.49, 0.48], [1, 0.495, 0.49, 0.99, 0.98]])  # 1-based
    assert train["b"] == _rows([[2, 0.945, 0.89, 0.11, 0.22], [2, 0.095, 0.28, 0.19, 0.2]])
    assert train["c"] == [] and train["d"] == _rows([[1, 0.14, 0.28, 0.1, 0.2]])
    assert _labels(data, "val") == {"e": [], "g": _rows([[2, 0.19, 0.38, 0.2, 0.4]]), "h": []}
    assert sorted(p.name for p in (data.yaml.parent / "images" / "val").iterdir()) == ["e.jpg", "g.jpg", "h.jpg"]
    import yaml

    cfg = yaml.safe_load(data.yaml.read_text())
    assert cfg["train"] == "images/train" and cfg["names"] == {0: "bird", 1: "cat", 2: "dog"} and "test" not in cfg

    stamp = data.yaml.stat().st_mtime_ns  # converted once: a second call reads the cache
    with pytest.warns(UserWarning):
        again = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert again.yaml == data.yaml and again.yaml.stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning, match="5 objects of classes the model does not have"):
        named = detection_data(root, names=["dog", "bird"], keep_difficult=True, cache_dir=tmp_path / "cache")
    assert named.yaml != data.yaml and named.difficult == 0 and named.names == ["dog", "bird"]
    assert _labels(named, "train")["d"] == _rows([[1, 0.14, 0.28, 0.1, 0.2]])
    assert detection_data(named.yaml).names == ["dog", "bird"]  # a YOLO data yaml is taken as it is

    (root / "Annotations" / "e.xml").write_text(  # an edited annotation converts again
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax>"
        "</bndbox></object></annotation>")
    with pytest.warns(UserWarning):
        edited = voc_to_yolo(root, cache_dir=tmp_path / "cache")
    assert edited.yaml != data.yaml and edited.objects["val"] == 2
    with pytest.raises(PrunekitError, match="not a Pascal VOC directory"):
        voc_to_yolo(tmp_path, cache_dir=tmp_path / "cache")
    (root / "ImageSets" / "Main" / "val.txt").write_text("e\ng\nf\n")  # f: listed without an annotation
    (root / "JPEGImages" / "f.jpg").write_bytes((root / "JPEGImages" / "e.jpg").read_bytes())
    with pytest.raises(PrunekitError, match=r"val\.txt lists 1 image\(s\) without an annotation .*\(e\.g\. f\)"):
        voc_to_yolo(root, cache_dir=tmp_path / "cache")
    (root / "ImageSets" / "Main" / "val.txt").write_text("h\n")  # no object left in a split (h's fish is unknown)
    with pytest.raises(PrunekitError, match="split 'val' has no object left"):
        voc_to_yolo(root, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def bccd(tmp_path_factory):
    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    with pytest.warns(UserWarning, match="bccd: .*boxes") as record:
        data = voc_to_yolo(BCCD, cache_dir=tmp_path_factory.mktemp("bccd"))
    assert len(record) == 1
    return data


def test_bccd_converts_with_counted_fixes(bccd) -> None:
    import re

    data = bccd
    assert data.names == ["Platelets", "RBC", "WBC"]
    assert data.images == {"train": 205, "val": 87, "test": 72}
    listed = [i for s in ("train", "val", "test") for i in (BCCD / "ImageSets/Main" / f"{s}.txt").read_text().split()]
    in_xml = sum(len(re.findall("<object>", (BCCD / "Annotations" / f"{i}.xml").read_text())) for i in listed)
    assert sum(data.objects.values()) + data.dropped_empty + data.difficult + data.unknown_class == in_xml
    assert data.clipped + data.dropped_empty > 0
    for split in data.images:
        for rows in _labels(data, split).values():
            for _, cx, cy, w, h in rows:
                assert 0 < w <= 1 and 0 < h <= 1 and 0 <= cx - w / 2 + 1e-6 and cx + w / 2 <= 1 + 1e-6
                assert 0 <= cy - h / 2 + 1e-6 and cy + h / 2 <= 1 + 1e-6


# ---- training ----
def test_training_keeps_the_pruned_model(bccd, tmp_path: Path) -> None:
    subset_yaml(bccd, tmp_path, {"train": 16, "val": 8})
    model = base("yolov8n")
    pk.prune(model, "l1-norm", X, speedup=1.5, ignored_layers=yolo.protected_layers(model))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    class Recorder:
        """A regulariser stand-in: records the rate it is called with."""

        s, calls = 1e-3, []

        def __call__(self, m: nn.Module) -> None:
            self.calls.append(self.s)

    hook = Recorder()
    metrics = yolo.train(model, tmp_path / "data.yaml", epochs=1, imgsz=160, batch=8, workers=0,
                         project=tmp_path / "runs", seed=0, after_backward=hook)
    # 2 batches of 8 accumulate into one step (nbs 64, capped at the run's batches): the rate is per mean loss,
    # so it is scaled by the 16 images that Ultralytics' summed loss covers
    assert hook.calls == [pytest.approx(1e-3 * 16)]
    assert hook.s == 1e-3
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes  # not rebuilt from the yaml
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    assert 0.0 <= metrics["metrics/mAP50(B)"] <= 1.0 and 0.0 <= metrics["metrics/mAP50-95(B)"] <= 1.0
    assert all(torch.isfinite(t).all() for t in outputs(model))
    with pytest.raises(PrunekitError, match="predicts 5 classes but .* has 3"):
        yolo.train(pk.models.create("ul:yolov3-tinyu", num_classes=5), tmp_path / "data.yaml")


def test_interrupted_training_resumes_from_its_next_epoch(bccd, tmp_path: Path, monkeypatch) -> None:
    """A run killed after epoch 1 of 2 continues at epoch 2 with the model it trained, not a rebuilt one."""
    yolo.ultralytics()  # offline before this test's own import from Ultralytics
    from ultralytics.models.yolo.detect import DetectionTrainer

    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    model = base("yolov3-tinyu")
    pk.prune(model, "l1-norm", X, speedup=1.5)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    run = {"epochs": 2, "imgsz": 160, "batch": 8, "workers": 0, "project": tmp_path / "runs", "name": "r", "seed": 0,
           "plots": False}
    callbacks = DetectionTrainer.run_callbacks

    def die_after_save(self, event):  # the kill comes right after epoch 1's checkpoint is written (and signed)
        callbacks(self, event)
        if event == "on_model_save":
            raise KeyboardInterrupt

    monkeypatch.setattr(DetectionTrainer, "run_callbacks", die_after_save)
    with pytest.raises(KeyboardInterrupt):
        yolo.train(model, tmp_path / "data.yaml", **run)
    monkeypatch.setattr(DetectionTrainer, "run_callbacks", callbacks)
    starts, train_loop = [], DetectionTrainer._do_train

    def record_start(self):
        out = train_loop(self)
        starts.append(self.start_epoch)  # set by resume_training inside the loop's set-up
        return out

    monkeypatch.setattr(DetectionTrainer, "_do_train", record_start)
    resumed = base("yolov3-tinyu")  # the same pruned architecture, as the pipeline reloads it from its file
    pk.prune(resumed, "l1-norm", X, speedup=1.5)
    yolo.train(resumed, tmp_path / "data.yaml", resume=True, **run)
    assert starts == [1]  # epoch index 1: the second of two
    assert {k: tuple(v.shape) for k, v in resumed.state_dict().items()} == shapes


def test_a_kill_between_ultralytics_write_and_signature_loses_only_that_epoch(bccd, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """Killed after Ultralytics wrote epoch 2's last.pt but before prunekit signed it: the run resumes at epoch 2
    from epoch 1's signed checkpoint, with no "not written on this machine" restart."""
    yolo.ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    run = {"epochs": 3, "imgsz": 64, "batch": 8, "workers": 0, "project": tmp_path / "runs", "name": "r", "seed": 0,
           "plots": False}
    write, lasts = Path.write_bytes, []

    def die_after_second_last(self, data):  # the kill lands right after the bytes of epoch 2's last.pt
        out = write(self, data)
        if "last" in self.name:
            lasts.append(self.name)
            if len(lasts) == 2:
                raise KeyboardInterrupt
        return out

    model = base("yolov3-tinyu")
    monkeypatch.setattr(Path, "write_bytes", die_after_second_last)
    with pytest.raises(KeyboardInterrupt):
        yolo.train(model, tmp_path / "data.yaml", **run)
    monkeypatch.setattr(Path, "write_bytes", write)
    starts, train_loop = [], DetectionTrainer._do_train

    def record_start(self):
        out = train_loop(self)
        starts.append(self.start_epoch)
        return out

    monkeypatch.setattr(DetectionTrainer, "_do_train", record_start)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "not written by prunekit" restart
        yolo.train(base("yolov3-tinyu"), tmp_path / "data.yaml", resume=True, **run)
    assert starts == [1]
    weights = tmp_path / "runs" / "r" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]  # no pending file left behind
    assert yolo._signed(weights / "last.pt", weights.parent / "prunekit-signatures.json")


def subset_yaml(bccd, tmp_path: Path, sizes: dict[str, int]) -> Path:
    """A YOLO data yaml over the first images of each BCCD split (txt lists, as Ultralytics reads them)."""
    import yaml

    root, entries = bccd.yaml.parent, {}
    for split, n in sizes.items():
        images = sorted((root / "images" / split).iterdir())[:n]
        (tmp_path / f"{split}.txt").write_text("".join(f"{p}\n" for p in images))
        entries[split] = str(tmp_path / f"{split}.txt")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**entries, "names": dict(enumerate(bccd.names))}))
    return tmp_path / "data.yaml"


def test_pipeline_runs_a_detector_end_to_end(bccd, tmp_path: Path) -> None:
    """sparsify → prune → finetune on a detector: Ultralytics trains prunekit's model, mAP is the metric."""
    data = subset_yaml(bccd, tmp_path, {"train": 16, "val": 8, "test": 8})
    assert yolo.data.detection_data(data).images == {"train": 16, "val": 8, "test": 8}
    fast = {"workers": 0, "plots": False, "val": True}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 160, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "net-slim"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "sparsify", "epochs": 1, "s": 1e-3, "ultralytics": fast}, {"stage": "prune"},
                      {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    assert metrics["task"] == "detect" and metrics["metric"] == "mAP50-95"
    before, after = metrics["before"], metrics["after"]
    assert before["macs"] / after["macs"] == pytest.approx(1.5, rel=0.03)
    assert all(0 <= r[k] <= 100 for r in (before, after) for k in ("mAP50", "mAP50-95"))
    pruned = pk.load(metrics["models"]["after"])
    assert count_macs(pruned, torch.zeros(1, 3, 160, 160)) == after["macs"]
    assert [p.name for p in sorted((tmp_path / "run" / "stages").iterdir())] == [
        "01-sparsify", "02-prune", "03-finetune"]
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test"] == 8
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    curve = [r for r in log if "epoch" in r and "val_mAP50-95" in r]  # the report's curve: one row per epoch
    assert [r["epoch"] for r in curve] == [1, 1]  # sparsify's and finetune's; best.pt's final evaluation is not one
    again = pipeline.run(cfg)  # finished stages are skipped, the same models come back
    assert again["after"]["macs"] == after["macs"]
    with pytest.raises(PrunekitError, match="under 'ultralytics:'"):
        pipeline.validate(cfg | {"stages": [{"stage": "train", "epochs": 1, "lr": 0.1}]})
    with pytest.raises(PrunekitError, match="task must be detect"):
        pipeline.validate(cfg | {"task": "classify"})


def test_unstructured_zeros_stay_zero_through_a_detector_finetune(bccd, tmp_path: Path) -> None:
    """magnitude on a detector: Ultralytics' fine-tune (AdamW, its EMA, best.pt) must not revive a zero."""
    data = subset_yaml(bccd, tmp_path, {"train": 16, "val": 8, "test": 8})
    fast = {"workers": 0, "plots": False, "val": True, "optimizer": "AdamW", "lr0": 0.01}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 160, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "magnitude"}, "target": {"sparsity": 0.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    pruned = pk.load(tmp_path / "run" / "stages" / "01-prune" / "model.pt")
    tuned = dict(pk.load(metrics["models"]["after"]).named_parameters())
    zeros = {n: p == 0 for n, p in pruned.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    assert sum(int(z.sum()) for z in zeros.values()) > 0.4 * sum(z.numel() for z in zeros.values())
    assert all(bool((tuned[n][z] == 0).all()) for n, z in zeros.items())
    assert any(not torch.equal(tuned[n], p) for n, p in pruned.named_parameters())  # and it did train


def test_a_planted_checkpoint_is_never_unpickled(bccd, tmp_path: Path) -> None:
    """A run folder from elsewhere: its last.pt carries no signature of this machine, so it is not opened."""
    import pickle

    class Plant:
        def __reduce__(self):
            return (open, (str(tmp_path / "MARKER"), "w"))

    subset_yaml(bccd, tmp_path, {"train": 8, "val": 4})
    weights = tmp_path / "runs" / "r" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").write_bytes(pickle.dumps(Plant()))
    (tmp_path / "runs" / "r" / "prunekit-signatures.json").write_text('{"last.pt": "forged"}')
    model = base("yolov3-tinyu")
    with pytest.warns(UserWarning, match="not written by prunekit on this machine"):
        yolo.train(model, tmp_path / "data.yaml", epochs=1, imgsz=64, batch=8, workers=0, project=tmp_path / "runs",
                   name="r", plots=False, resume=True)
    assert not (tmp_path / "MARKER").exists()


def test_two_detector_runs_with_one_relative_out_keep_their_own_files(bccd, tmp_path: Path, monkeypatch) -> None:
    """Each run's Ultralytics folder lives under its own out, whatever out looks like."""
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    fast = {"workers": 0, "plots": False}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1}, "out": "run",
           "stages": [{"stage": "train", "epochs": 1, "ultralytics": fast}]}
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        pipeline.run(cfg)
    for where in ("a", "b"):
        weights = tmp_path / where / "run" / "stages" / "01-train" / "ultralytics" / "weights"
        assert (weights / "last.pt").is_file() and (weights.parent / "prunekit-signatures.json").is_file()


def test_killed_detector_stage_with_a_relative_out_resumes_from_its_epoch(bccd, tmp_path: Path) -> None:
    """kill -9 during epoch 2 of 3 of a run whose out is relative; the re-run continues at epoch 2."""
    import signal
    import time

    import yaml

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1}, "out": "run",
           "stages": [{"stage": "train", "epochs": 3, "ultralytics": {"workers": 0, "plots": False}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    signed = tmp_path / "run" / "stages" / "01-train" / "ultralytics" / "prunekit-signatures.json"
    cmd = [sys.executable, "-m", "prunekit", "run", "cfg.yaml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not signed.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert signed.exists(), "epoch 1 never finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming training" in again.stdout + again.stderr and "from epoch 1 " not in again.stdout + again.stderr


def test_head_distillation_is_zero_for_the_teacher_itself_and_pulls_otherwise() -> None:
    from prunekit.yolo.distill import head_kd

    g = torch.Generator().manual_seed(0)
    t = {"scores": torch.randn(2, 3, 50, generator=g), "boxes": torch.randn(2, 64, 50, generator=g)}
    s = {"scores": t["scores"].clone().requires_grad_(True), "boxes": t["boxes"].clone().requires_grad_(True)}
    same = head_kd(s, t, 2.0)
    bce_floor = torch.nn.functional.binary_cross_entropy_with_logits(
        t["scores"], torch.sigmoid(t["scores"]), reduction="none").sum(1)
    w = torch.sigmoid(t["scores"]).amax(1)
    assert same.item() == pytest.approx(float((bce_floor * w).sum() / w.sum()), rel=1e-5)  # the KL part is 0
    moved = {"scores": s["scores"] + 1.0, "boxes": s["boxes"] * 0.5}
    loss = head_kd(moved, t, 2.0)
    assert loss > same
    loss.backward()
    assert s["scores"].grad.abs().sum() > 0 and s["boxes"].grad.abs().sum() > 0
    with pytest.raises(PrunekitError, match="same classes, strides and image size"):
        head_kd({"scores": torch.zeros(2, 3, 40), "boxes": torch.zeros(2, 64, 40)}, t, 2.0)


def test_a_distilled_detector_finetune_keeps_the_pruned_model(bccd, tmp_path: Path) -> None:
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    fast = {"workers": 0, "plots": False}
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "data": {"name": str(data), "image_size": 64, "batch_size": 8,
                                                          "calibration_batches": 1},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"},
                      {"stage": "finetune", "epochs": 1, "ultralytics": fast,
                       "distill": {"teacher": "before", "alpha": 1.0, "temperature": 2.0}}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)
    pruned = pk.load(metrics["models"]["after"])
    assert getattr(pruned, "criterion", None) is None  # the teacher never rides along
    other = tmp_path / "other.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=5, imgsz=64), other)
    bad = {**cfg, "out": str(tmp_path / "run2")}
    bad["stages"] = [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast,
                                          "distill": {"teacher": str(other)}}]
    with pytest.raises(PrunekitError, match=r"finetune\.distill\.teacher predicts"):
        pipeline.run(bad)


def test_a_config_that_names_only_a_detector_checkpoint_runs_the_detection_task(bccd, tmp_path: Path) -> None:
    """No `task:` needed: the model name the file records says it (a compare's checkpoint base too)."""
    from prunekit import compare

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    base = tmp_path / "base.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=3, imgsz=64), base)
    run = {"model": {"checkpoint": str(base)}, "data": {"name": str(data), "image_size": 64},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5}, "out": str(tmp_path / "run"),
           "stages": [{"stage": "prune"}]}
    assert pipeline.validate(dict(run))["task"] == "detect"
    with pytest.raises(PrunekitError, match="task must be detect"):
        pipeline.validate({**run, "model": {"name": "ul:yolov3-tinyu"}, "task": "classify"})
    cmp = compare.validate({"base": {"checkpoint": str(base)}, "data": {"name": str(data), "image_size": 64},
                            "methods": ["l1-norm"], "targets": [1.5], "seeds": [0], "budget": 1,
                            "out": str(tmp_path / "cmp")})
    assert compare._base_config(cmp, tmp_path / "cmp")["task"] == "detect"
    assert {c["config"]["task"] for c in compare._cells(cmp, compare._entries(cmp), tmp_path / "cmp")} == {"detect"}


def test_every_cli_command_takes_a_detector_file(bccd, tmp_path: Path, capsys) -> None:
    """prune (data-free and with --data), export --format onnx, eval, finetune (with --distill) on a ul: file."""
    from prunekit.cli import main

    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    base = tmp_path / "base.pt"
    pk.save(pk.models.create("ul:yolov3-tinyu", num_classes=3, imgsz=64), base)
    assert main(["prune", "--checkpoint", str(base), "--method", "l1-norm", "--speedup", "1.5", "--out",
                 str(tmp_path / "p.pt")]) == 0
    assert main(["prune", "--checkpoint", str(base), "--method", "imp-sim", "--speedup", "1.5", "--data", str(data),
                 "--out", str(tmp_path / "q.pt")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "p.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "p.onnx")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "p.pt"), "--data", str(data), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP50"] <= 1
    assert main(["finetune", "--checkpoint", str(tmp_path / "p.pt"), "--data", str(data), "--epochs", "1",
                 "--batch-size", "8", "--distill", str(base), "--out", str(tmp_path / "ft")]) == 0
    tuned = pk.load(tmp_path / "ft" / "model.pt")
    assert count_macs(tuned, torch.zeros(1, 3, 64, 64)) == count_macs(pk.load(tmp_path / "p.pt"),
                                                                      torch.zeros(1, 3, 64, 64))


# ---- the detection task: mAP on labelled batches, auto-mend on detectors ----
class _Oracle(nn.Module):
    """Predicts given boxes (letterboxed pixels, xywh) with class score 1: a detector whose mAP is known."""

    def __init__(self, boxes: list[torch.Tensor], nc: int, shift: float = 0.0):
        super().__init__()
        self.model = nn.ModuleList([nn.Identity()])
        self.model[-1].nc = nc
        self.boxes, self.nc, self.shift = boxes, nc, shift
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        out = torch.zeros(len(x), 4 + self.nc, 64)
        for i, lab in enumerate(self.boxes[: len(x)]):
            n = len(lab)
            out[i, :4, :n] = (lab[:, 2:] * size).T
            out[i, 0, :n] += self.shift * out[i, 2, :n]  # moved right by a fraction of its width
            out[i, 4 + lab[:, 1].long(), torch.arange(n)] = 1.0
        self.boxes = self.boxes[len(x):]
        return out


def test_detection_task_scores_labelled_batches_by_map(bccd) -> None:
    from prunekit.yolo.task import TASK, LabelledBatches

    batches = list(LabelledBatches(bccd, "val", imgsz=160, batch=4))[:2]
    labels = [lab[lab[:, 0] == i] for _, lab in batches for i in range(4)]
    assert all(((lab[:, 2:4] > 0) & (lab[:, 2:4] < 1)).all() for lab in labels)
    perfect = TASK.evaluate(_Oracle(labels, len(bccd.names)), batches, torch.device("cpu"))
    assert perfect["mAP50"] > 99 and perfect["mAP50-95"] > 99  # 99.5: COCO interpolation's ceiling
    moved = TASK.evaluate(_Oracle(labels, len(bccd.names), shift=0.3), batches, torch.device("cpu"))
    assert moved["mAP50-95"] < 60  # IoU ~0.54 per box: found at 0.5, missed above


@pytest.mark.parametrize("name", ["yolov3-tinyu", "yolov8n"])
def test_auto_mend_prunes_a_detector_by_map(name: str, bccd, tmp_path: Path) -> None:
    """Through pk.prune with letterboxed calibration and labelled val batches, and (tinyu) through the pipeline."""
    from prunekit.yolo.data import image_batches
    from prunekit.yolo.task import LabelledBatches

    model = base(name)
    calib = image_batches(bccd, "train", imgsz=160, batch=4, limit=8)
    val = LabelledBatches(bccd, "val", imgsz=160, batch=4)
    res = pk.prune(model, "auto-mend", speedup=1.5, data=calib, val=list(val)[:2], candidates=3,
                   calibration_batches=1, val_batches=2, ignored_layers=yolo.protected_layers(model))
    assert res.speedup == pytest.approx(1.5, rel=0.03)
    assert res.info["metric"] == "mAP50-95" and len(res.info["candidates"]) == 3
    if name != "yolov3-tinyu":
        return
    data = subset_yaml(bccd, tmp_path, {"train": 8, "val": 4, "test": 4})
    cfg = {"model": {"name": "ul:yolov3-tinyu"}, "out": str(tmp_path / "run"),
           "data": {"name": str(data), "image_size": 160, "batch_size": 4, "calibration_batches": 1},
           "method": {"name": "auto-mend", "params": {"candidates": 2, "calibration_batches": 1, "val_batches": 1}},
           "target": {"speedup": 1.5}, "stages": [{"stage": "prune"}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)


def _trained_pt(path: Path, names: list[str]) -> Path:
    """What Ultralytics' trainer writes: a pickled DetectionModel with its class names (BN randomised: 'trained')."""
    torch.manual_seed(3)
    net = randomise_bn(yolo.build_detection_model("ul:yolov3-tinyu", len(names)))
    net.names = dict(enumerate(names))
    torch.save({"model": net, "epoch": 5}, path)
    return path


def _folders_from_bccd(root: Path, n: int = 24) -> dict[str, Path]:
    """The same BCCD images as a LabelImg VOC folder and as a YOLO txt folder with classes.txt, neither split."""
    import shutil
    import xml.etree.ElementTree as ET

    from PIL import Image

    ids = sorted(p.stem for p in (BCCD / "Annotations").glob("*.xml"))[:n]
    voc, yl = root / "labelimg", root / "yolo"
    order = ["RBC", "WBC", "Platelets"]
    for d in (voc / "annotations", voc / "images", yl / "images", yl / "labels"):
        d.mkdir(parents=True)
    for i in ids:
        shutil.copyfile(BCCD / "Annotations" / f"{i}.xml", voc / "annotations" / f"{i}.xml")
        for d in (voc / "images", yl / "images"):
            shutil.copyfile(BCCD / "JPEGImages" / f"{i}.jpg", d / f"{i}.jpg")
        with Image.open(BCCD / "JPEGImages" / f"{i}.jpg") as im:
            w, h = im.size
        rows = []
        for obj in ET.parse(BCCD / "Annotations" / f"{i}.xml").getroot().iter("object"):
            x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
            if x1 > x0 and y1 > y0:
                rows.append(f"{order.index(obj.findtext('name'))} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                            f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
        (yl / "labels" / f"{i}.txt").write_text("".join(rows))
    (yl / "labels" / "classes.txt").write_text("\n".join(order) + "\n")
    return {"labelimg": voc, "yolo": yl}


@pytest.mark.parametrize("layout", ["labelimg", "yolo"])
def test_pipeline_prunes_my_trained_detector_on_my_folder(layout: str, tmp_path: Path, capsys) -> None:
    """A user's Ultralytics best.pt on a folder without splits: a seeded split is made and kept with the run,
    the detector keeps its trained weights and classes, prune -> 1-epoch fine-tune runs; other classes refused."""
    if not BCCD.is_dir():
        pytest.skip(f"shared BCCD copy not found at {BCCD}")
    folder = _folders_from_bccd(tmp_path)[layout]
    names = ["Platelets", "RBC", "WBC"] if layout == "labelimg" else ["RBC", "WBC", "Platelets"]
    best = _trained_pt(tmp_path / "best.pt", names)
    fast = {"workers": 0, "plots": False, "val": True}
    cfg = {"model": {"name": f"ul:{best}", "trust_pickle": True}, "out": str(tmp_path / "run"),
           "data": {"name": str(folder), "image_size": 160, "batch_size": 8, "calibration_batches": 1},
           "method": {"name": "l1-norm"}, "target": {"speedup": 1.5},
           "stages": [{"stage": "prune"}, {"stage": "finetune", "epochs": 1, "ultralytics": fast}]}
    metrics = pipeline.run(cfg)
    assert metrics["before"]["macs"] / metrics["after"]["macs"] == pytest.approx(1.5, rel=0.03)
    assert sum(metrics["split"].values()) == 24 and all(metrics["split"].values())
    err = capsys.readouterr().err  # every split's images and boxes are said at load, changed or not
    assert all(f"prunekit: data {s}: {metrics['split'][s]} images" in err for s in ("train", "val", "test"))
    assert sorted(p.name for p in (tmp_path / "run" / "splits").iterdir()) == ["test.txt", "train.txt", "val.txt"]
    before = pk.load(metrics["models"]["before"])
    trained = torch.load(best, weights_only=False)["model"]
    x = torch.rand(1, 3, 160, 160)
    torch.testing.assert_close(outputs(before, x)[0], outputs(trained, x)[0])  # its weights, not fresh ones
    _trained_pt(tmp_path / "other.pt", names[::-1])
    with pytest.raises(PrunekitError, match="was trained on classes"):
        pipeline.run(cfg | {"model": {"name": f"ul:{tmp_path / 'other.pt'}", "trust_pickle": True},
                            "out": str(tmp_path / "run2")})
    with pytest.raises(PrunekitError, match="trust_pickle"):
        pipeline.run(cfg | {"model": {"name": f"ul:{best}"}, "out": str(tmp_path / "run3")})


def test_cli_prunes_my_trained_detector(tmp_path: Path, capsys) -> None:
    from prunekit.cli import main

    best = _trained_pt(tmp_path / "best.pt", ["a", "b", "c"])
    out = tmp_path / "pruned.pt"
    args = ["prune", "--model", f"ul:{best}", "--method", "l1-norm", "--speedup", "1.5", "--image-size", "160",
            "--out", str(out)]
    assert main(args) == 2 and "trust_pickle" in capsys.readouterr().err  # a pickle is opened only when trusted
    assert main([*args, "--trust-pickle"]) == 0
    pruned = pk.load(out)
    assert pruned.prunekit_arch["name"] == "ul:yolov3-tinyu" and pruned.prunekit_arch["input_shape"] == [3, 160, 160]
    assert main(["prune", "--model", "ul:yolov8n", "--method", "l1-norm", "--speedup", "1.5", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "--model takes ul:path/to/best.pt" in capsys.readouterr().err


def test_a_detector_run_folder_is_its_own_and_links_in_it_are_never_written_through(bccd, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    yolo.ultralytics()  # prunekit's offline set-up first: importing Ultralytics itself checks connectivity
    from ultralytics.engine import trainer as ul_trainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    seen, original = {}, ul_trainer.check_amp
    monkeypatch.setattr(DetectionTrainer, "train", lambda self: seen.update(save_dir=self.save_dir,
                                                                            amp=ul_trainer.check_amp))
    model = base("yolov8n")
    yolo.train(model, bccd.yaml, epochs=1, imgsz=160, project=tmp_path / "copy", name="ultralytics")
    assert seen["save_dir"] == (tmp_path / "copy" / "ultralytics").resolve()  # never the folder a checkpoint names
    assert seen["amp"] is not original and ul_trainer.check_amp is original  # patched for the training only
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"precious")
    weights = tmp_path / "linked" / "ultralytics" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").symlink_to(victim)
    with pytest.raises(PrunekitError, match="last.pt is a symbolic link: prunekit never writes through a link"):
        yolo.train(model, bccd.yaml, epochs=1, imgsz=160, project=tmp_path / "linked", name="ultralytics",
                   resume=True)
    assert victim.read_bytes() == b"precious"
