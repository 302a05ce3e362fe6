"""S2 auto-mend: MACs budget, seeded search, the w⁰ floor, honest scoring, resume, errors, save/load."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit import tasks
from prunekit.errors import PrunekitError
from prunekit.graph import PruneGraph
from prunekit.methods import get

SMALL = dict(candidates=12, population=4, calibration_batches=4, progress=False)


@pytest.fixture(scope="module")
def digits():
    """A briefly trained digits CNN, fixed calibration batches (training split) and held-out val batches."""
    torch.manual_seed(0)
    bundle = pk.data.load("digits").holdout(0.2, seed=0)
    model = pk.models.create("digits_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train, _ = bundle.loaders(batch_size=64)
    model.train()
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    calib = list(bundle.eval_loader(bundle.train, 64, shuffle=True, seed=0))
    val = list(bundle.eval_loader(bundle.val, 128))
    return model.eval(), calib, val


def _prune(digits, speedup: float = 3.0, **opts) -> pk.PruneResult:
    model, calib, val = digits
    return pk.prune(copy.deepcopy(model), "auto-mend", speedup=speedup, data=calib, val=val, **(SMALL | opts))


def test_lands_on_target_and_scores_only_candidates_within_one_percent(digits):
    result = _prune(digits)
    assert result.speedup == pytest.approx(3.0, rel=0.03)
    info = result.info
    assert info["evaluated"] == SMALL["candidates"]
    # Recount every scored candidate on a fresh graph of the unpruned model, independent of the method's own count.
    pg = PruneGraph(copy.deepcopy(digits[0]), digits[1][0][0])
    assert [g.name for g in pg.groups] == info["groups"]
    for c in info["candidates"]:
        ratio = pg.base_macs / pg.macs(dict(enumerate(c["widths"])))
        assert ratio == pytest.approx(c["speedup"])
        assert abs(ratio / 3.0 - 1) <= 0.01, c
    assert [result.channels[n][1] for n in info["groups"]] == info["widths"]
    x = digits[2][0][0]
    assert result.model(x).shape == digits[0](x).shape


def test_same_seed_same_widths(digits):
    a, b = _prune(digits, seed=3), _prune(digits, seed=3)
    assert a.info["widths"] == b.info["widths"]
    assert [c["widths"] for c in a.info["candidates"]] == [c["widths"] for c in b.info["candidates"]]
    assert a.info["trajectory"] == b.info["trajectory"]


@pytest.mark.parametrize("search", ["evolution", "random"])
def test_w0_is_scored_first_and_the_result_never_scores_below_it(digits, search):
    result = _prune(digits, search=search)
    info = result.info
    assert info["search"] == search and info["evaluated"] == SMALL["candidates"]
    assert info["candidates"][0]["widths"] == info["w0"]
    assert info["best_score"]["top1"] >= info["w0_score"]["top1"]
    assert info["trajectory"] == sorted(info["trajectory"])
    assert len({tuple(c["widths"]) for c in info["candidates"]}) == len(info["candidates"])  # nothing scored twice
    # The returned, physically pruned model keeps the winner's re-estimated BN statistics: it scores what the
    # masked candidate scored.
    val = tasks.get("classify").evaluate(result.model, digits[2], torch.device("cpu"))
    assert val["top1"] == pytest.approx(info["best_score"]["top1"])
    assert val["loss"] == pytest.approx(info["best_score"]["loss"], rel=1e-4)


def test_evolution_and_random_differ_after_the_shared_random_start(digits):
    evo, rnd = _prune(digits, search="evolution"), _prune(digits, search="random")
    evo_w, rnd_w = ([c["widths"] for c in r.info["candidates"]] for r in (evo, rnd))
    first = SMALL["population"]
    assert evo_w[:first] == rnd_w[:first]
    assert evo_w != rnd_w


def test_a_killed_search_resumes_from_its_cache(digits, tmp_path):
    path = tmp_path / "search.json"
    _prune(digits, candidates=6, cache_path=str(path))
    assert len(json.loads(path.read_text())["candidates"]) == 6
    resumed = _prune(digits, cache_path=str(path))
    assert resumed.info["resumed"] == 6
    assert resumed.info["widths"] == _prune(digits).info["widths"]
    with pytest.raises(PrunekitError, match="another model, target or data"):
        _prune(digits, speedup=2.0, cache_path=str(path))


def test_missing_data_or_val_and_misspelt_options_are_clear_errors(digits):
    model, calib, val = digits
    with pytest.raises(PrunekitError, match="calibration batches from the training data"):
        pk.prune(copy.deepcopy(model), "auto-mend", calib[0][0], speedup=2.0, val=val)
    with pytest.raises(PrunekitError, match="held-out validation split"):
        pk.prune(copy.deepcopy(model), "auto-mend", speedup=2.0, data=calib)
    with pytest.raises(PrunekitError, match="no option candidats"):
        pk.prune(copy.deepcopy(model), "auto-mend", speedup=2.0, data=calib, val=val, candidats=5)
    with pytest.raises(PrunekitError, match="option search must be one of"):
        pk.prune(copy.deepcopy(model), "auto-mend", speedup=2.0, data=calib, val=val, search="grid")
    with pytest.raises(PrunekitError, match="option population must be >= 2, got 1"):
        _prune(digits, population=1)


def test_figures_draw_trajectory_and_widths(digits):
    figures = get("auto-mend").figures(_prune(digits, candidates=5).info)
    assert [name for name, _ in figures] == ["search", "widths"]
    assert all(png.startswith(b"\x89PNG") for _, png in figures)


def test_resnet20_pruned_model_matches_its_score_and_reloads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = pk.models.create("resnet20", num_classes=10)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    result = pk.prune(model, "auto-mend", speedup=2.0, data=batches[:2], val=batches[2:], candidates=4, population=2,
                      calibration_batches=2, round_to=2, progress=False)
    assert result.speedup == pytest.approx(2.0, rel=0.03)
    assert all(w % 2 == 0 or w == s for w, s in zip(result.info["widths"], result.info["sizes"], strict=True))
    # residual groups too: masking a candidate computes what removing its channels does
    assert result.info["pruned_val"]["loss"] == pytest.approx(result.info["best_score"]["loss"], rel=1e-4)
    x = batches[3][0]
    expected = result.model.eval()(x).detach()
    assert expected.shape == (16, 10)
    pk.save(result.model, tmp_path / "m.pt")
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = ("import sys, torch, prunekit as pk; m = pk.load(sys.argv[1]).eval(); d = torch.load(sys.argv[2]); "
            "assert torch.allclose(m(d['x']), d['y'], atol=1e-5), 'outputs differ'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
