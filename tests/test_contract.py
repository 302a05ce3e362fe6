"""The method contract: declared options in all three interfaces, the held-out validation split, any
model saved, layer shapes recorded, hooks that never stay behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import prunekit as pk
from prunekit import methods
from prunekit.compensate import fold_constant_into
from prunekit.errors import PrunekitError
from prunekit.measure import hooked
from prunekit.pipeline import run, validate
from prunekit.train import evaluate

from .conftest import run_cli


class UserNet(nn.Module):
    """Not in the zoo: a branch that concatenates, a residual add, LayerNorm-free but with a bias-free conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(s + self.mix(torch.cat([self.a(s), self.b(s)], 1)))
        return self.head(y.mean((2, 3)))


def _varied(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


def _fresh_process_outputs(path: Path, x: torch.Tensor, tmp: Path, model_code: str = "") -> torch.Tensor:
    """Load ``path`` in a new interpreter (optionally with ``model=`` built by ``model_code``) and run ``x``, with
    this process's thread count (a conv's sums are split by thread: bit-equal outputs need the same split)."""
    torch.save({"x": x}, tmp / "x.pt")
    code = (
        f"import sys, torch, prunekit as pk\ntorch.set_num_threads({torch.get_num_threads()})\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        f"{model_code}\n"
        f"m = pk.load({str(path)!r}{', model=base' if model_code else ''})\n"
        f"x = torch.load({str(tmp / 'x.pt')!r}, weights_only=True)['x']\n"
        f"with torch.no_grad(): torch.save(m(x), {str(tmp / 'y.pt')!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp / "y.pt", weights_only=True)


# ---- declared options ----
def test_misspelt_option_is_one_clear_error_in_python():
    model = pk.models.create("resnet20")
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(PrunekitError, match=r"no option rankin.*valid options:.*ranking"):
        pk.prune(model, "l1-norm", torch.randn(1, 3, 32, 32), speedup=2.0, rankin="global")
    with pytest.raises(PrunekitError, match="option ranking must be one of local, global, got 'sideways'"):
        pk.prune(model, "l1-norm", torch.randn(1, 3, 32, 32), speedup=2.0, ranking="sideways")
    with pytest.raises(PrunekitError, match="option min_keep must be int"):
        pk.prune(model, "l1-norm", torch.randn(1, 3, 32, 32), speedup=2.0, min_keep="2")
    for bad in (float("nan"), "2", True):
        with pytest.raises(PrunekitError, match="speedup must be a finite number"):
            pk.prune(model, "l1-norm", torch.randn(1, 3, 32, 32), speedup=bad)
    assert sum(p.numel() for p in model.parameters()) == n  # nothing was pruned by any refusal


def test_misspelt_option_is_one_clear_error_in_yaml_and_cli(tmp_path):
    cfg = {"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": str(tmp_path / "r"),
           "method": {"name": "l1-norm", "params": {"rankin": "global"}}, "target": {"speedup": 2.0},
           "stages": [{"stage": "prune"}]}
    with pytest.raises(PrunekitError, match=r"config error at 'method.params'.*no option rankin"):
        validate(cfg)
    cfg["method"] = {"name": "adaptive-slim"}
    cfg["stages"] = [{"stage": "sparsify", "epochs": 1, "ss": 0.1}]
    with pytest.raises(PrunekitError, match=r"stages\[0\]\.ss.*unknown key"):
        validate(cfg)
    cfg["method"] = {"name": "l1-norm"}
    cfg["stages"] = [{"stage": "sparsify", "epochs": 1}]
    with pytest.raises(PrunekitError, match="no sparsity regulariser"):
        validate(cfg)

    model_path = tmp_path / "m.pt"
    pk.save(pk.models.create("digits_cnn", in_channels=1), model_path)
    r = run_cli("prune", "--checkpoint", str(model_path), "--method", "l1-norm", "--speedup", "2",
                "--param", "rankin=global", "--out", str(tmp_path / "p.pt"))
    assert r.returncode == 2 and "no option rankin" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.pt").exists()
    r = run_cli("prune", "--checkpoint", str(model_path), "--method", "l1-norm", "--speedup", "2",
                "--param", "ranking=global", "--data", "digits", "--out", str(tmp_path / "p.pt"))
    assert r.returncode == 0, r.stderr
    r = run_cli("methods")
    assert r.returncode == 0 and "--param ranking=<str>" in r.stdout and "target: speedup" in r.stdout


def test_data_is_any_iterable_of_batches_and_missing_data_is_named():
    model = _varied(pk.models.create("resnet20"))
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    result = pk.prune(model, "l1-norm", data=batches, speedup=1.5)  # example inputs: the first batch
    assert 1.45 <= result.speedup <= 1.55
    ctx = methods.Context(torch.randn(1, 3, 32, 32))
    with pytest.raises(PrunekitError, match="needs calibration batches from the training data"):
        ctx.batches(4, "data", "some-method")
    with pytest.raises(PrunekitError, match="held-out validation split of the training data"):
        ctx.evaluate(model)
    with pytest.raises(PrunekitError, match="not a bare tensor"):
        pk.prune(model, "l1-norm", torch.randn(1, 3, 32, 32), speedup=1.2, data=torch.randn(4, 3, 32, 32))


# ---- the validation split ----
def test_holdout_is_disjoint_from_test_and_stable_under_a_seed():
    bundle = pk.data.load("digits")
    a, b, c = bundle.holdout(0.2, seed=0), bundle.holdout(0.2, seed=0), bundle.holdout(0.2, seed=1)
    assert torch.equal(a.val_indices, b.val_indices) and not torch.equal(a.val_indices, c.val_indices)
    assert len(a.val) + len(a.train) == len(bundle.train) and len(a.test) == len(bundle.test)
    flat = lambda s: {bytes(img.numpy()) for img in s.images}  # noqa: E731
    assert not flat(a.val) & flat(a.train) - flat(bundle.test)  # val and train are disjoint draws of train
    assert torch.equal(a.val.images, bundle.train.images[a.val_indices])  # val comes from the training split
    counts = torch.bincount(a.val.labels, minlength=10).float()
    assert counts.min() >= 0.7 * counts.mean()  # class-stratified
    with pytest.raises(PrunekitError, match="validation fraction"):
        bundle.holdout(1.5)


def test_pipeline_selects_on_the_validation_split_and_records_it(tmp_path):
    cfg = {"model": {"name": "digits_cnn"}, "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.2},
           "method": {"name": "l1-norm"}, "target": {"speedup": 2.0}, "device": "cpu", "out": str(tmp_path / "r"),
           "stages": [{"stage": "train", "epochs": 1, "lr": 0.1, "label_smoothing": 0.0}, {"stage": "prune"}]}
    metrics = run(cfg)
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    bundle = pk.data.load("digits")
    assert split["val"] == round(0.2 * len(bundle.train)) and split["test"] == len(bundle.test)
    assert split["val_indices"] == bundle.holdout(0.2, seed=0).val_indices.tolist()
    assert metrics["split"] == {"train": split["train"], "val": split["val"], "test": split["test"]}
    epoch = next(json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines() if '"epoch"' in x)
    model = pk.load(tmp_path / "r" / "stages" / "01-train" / "model.pt")
    held = bundle.holdout(0.2, seed=0)
    val_top1 = evaluate(model, held.eval_loader(held.val), "cpu")["top1"]
    assert abs(epoch["val_top1"] - val_top1) < 1e-6  # fit validated on the held-out split, not the test split


# ---- any model saved ----
def test_user_module_prunes_saves_and_loads_in_a_fresh_process(tmp_path):
    model = _varied(UserNet())
    x = torch.randn(3, 3, 16, 16)
    result = pk.prune(model, "l1-norm", x, speedup=1.6)
    with torch.no_grad():
        y = result.model(x)
    assert y.shape == (3, 5)
    pk.save(result.model, tmp_path / "user.pt")
    with pytest.raises(PrunekitError, match=r"user-defined model \(.*UserNet\).*model=MyNet"):
        pk.load(tmp_path / "user.pt")
    back = _fresh_process_outputs(tmp_path / "user.pt", x, tmp_path,
                                  "from tests.test_contract import UserNet\nbase = UserNet()")
    assert torch.equal(back, y)


def test_bias_created_by_compensation_round_trips(tmp_path):
    model = _varied(UserNet())
    consumer = model.mix[0]
    assert consumer.bias is None
    fold_constant_into(consumer, [0, 3], torch.tensor([0.5, -1.0]))  # no bias, no BN given: a bias is created
    assert consumer.bias is not None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    pk.save(model, tmp_path / "m.pt")
    assert torch.equal(pk.load(tmp_path / "m.pt", model=UserNet())(x), y)


@pytest.mark.parametrize("name", ["tv:convnext_tiny", "tv:mobilenet_v3_small", "tv:regnet_x_400mf"])
def test_torchvision_models_round_trip_after_pruning(name, tmp_path):
    """A sample of the sweep (benchmarks/tv_sweep.py checks all of them): convnext records LayerNorm shapes."""
    torch.manual_seed(0)
    model = pk.models.create(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    pk.prune(model, "l1-norm", x[:1], speedup=1.5)
    with torch.no_grad():
        y = model(x)
    pk.save(model, tmp_path / "m.pt")
    back = _fresh_process_outputs(tmp_path / "m.pt", x, tmp_path)
    assert torch.allclose(back, y, atol=1e-5)


def test_crafted_recipe_is_refused_before_anything_is_built(tmp_path):
    pk.save(pk.models.create("resnet20"), tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    obj["arch"]["layers"]["conv1"]["forward"] = 3
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(PrunekitError, match="conv1.forward=3, which is not a layer shape"):
        pk.load(tmp_path / "bad.pt")


# ---- one hook helper ----
def test_hooked_leaves_no_hook_and_restores_modes_when_the_forward_raises():
    model = UserNet().train()
    model.stem[1].eval()  # a frozen BN inside a training model stays frozen
    seen = []
    with pytest.raises(RuntimeError), hooked(model, [(model.stem, lambda m, i, o: seen.append(o.shape))]):
        assert not model.training
        model(torch.randn(1, 5, 8, 8))  # wrong channel count: the forward raises
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training and model.a.training and not model.stem[1].training
    assert torch.is_grad_enabled()


def test_example_inputs_are_real_images():
    bundle = pk.data.load("digits")
    x = pk.data.example_inputs(bundle, batch=4)
    assert x.shape == (4, 1, 8, 8) and x.std() > 0.5 and x.abs().sum() > 0


def test_config_file_with_method_params_round_trips_through_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "digits_cnn"}, "data": {"name": "digits"}, "out": "x",
                                    "method": {"name": "net-slim", "params": {"percentile": "50"}},
                                    "stages": [{"stage": "prune"}]}))
    r = run_cli("run", str(path))
    assert r.returncode == 2 and "option percentile must be int or float or null" in r.stderr


def test_a_new_method_kind_is_one_row_that_targets_and_the_guard_ask(monkeypatch):
    """A kind declared only in ``methods.kinds.KINDS`` (here: N:M-style sparsity, which zeros weights) takes the
    sparsity target, is refused a speedup by what it does, not by its name, and its method prunes."""
    from prunekit.measure import count_params
    from prunekit.methods import kinds
    from prunekit.methods.magnitude import magnitude_masks
    from prunekit.targets.base import ZEROS

    monkeypatch.setitem(kinds.KINDS, "nm-sparse", kinds.Kind("nm-sparse", "sparsity", frozenset({ZEROS}),
                                                            "sparsity", ("sparsity",)))
    monkeypatch.setattr(methods.registry, "REGISTRY", dict(methods.registry.REGISTRY))

    @methods.register("nm-test", "zero half of each layer", kind="nm-sparse")
    def nm_test(model: nn.Module, ctx: methods.Context, *, sparsity: float) -> methods.PruneResult:
        magnitude_masks(model, sparsity=sparsity).apply(model)
        size = {"params": count_params(model, nonzero=True), "macs": 1}
        return methods.PruneResult(model, "nm-test", {"sparsity": sparsity}, size, size)

    model = pk.models.create("digits_cnn", in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    res = pk.prune(model, "nm-test", x, sparsity=0.5)
    assert 0.45 <= count_params(res.model, nonzero=True) / count_params(res.model) <= 0.56
    assert "bn_recalibrate" not in methods.get("nm-test").options  # it removes no channels
    with pytest.raises(PrunekitError, match="method 'nm-test' is nm-sparse: a speedup target needs a method that "
                                            "removes channels"):
        pk.prune(pk.models.create("digits_cnn", in_channels=1), "nm-test", x, speedup=2.0)
    with pytest.raises(PrunekitError, match="method 'nm-test' needs a sparsity target"):
        pk.prune(pk.models.create("digits_cnn", in_channels=1), "nm-test", x)
