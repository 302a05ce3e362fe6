"""prunekit compare: one base, one budget, cells that are pipeline runs; resume, failed cells, the
leaderboard's keys, the "within noise" rule, the HTML page, and Torch-Pruning's methods as rows."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import prunekit as pk
from prunekit import compare, methods, pipeline
from prunekit.errors import PrunekitError
from prunekit.timing import label, ratio_stats, sequential, side_by_side

from .test_report import CHROMIUM

SMALL = {
    "name": "cmp-test", "data": {"name": "digits", "batch_size": 64},
    "base": {"model": {"name": "digits_cnn"}, "train": {"epochs": 3, "lr": 0.1, "label_smoothing": 0.0}},
    "methods": ["l1-norm", "tp-taylor", {"name": "l1-norm", "label": "l1-stuck", "params": {"min_keep": 1000}}],
    "targets": [2.0], "seeds": [0, 1], "budget": 1, "finetune": {"lr": 0.05, "label_smoothing": 0.0},
    "latency": {"batch": 8, "threads": 1, "rounds": 3, "runtimes": ["eager"]},
}
ROW_KEYS = {"method", "target", "seeds", "metric_mean", "metric_std", "metric_per_seed", "pruned_metric_mean",
            "macs_ratio", "params", "latency", "wall_s"}


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    return compare.run(copy.deepcopy(SMALL), out=out), out


def test_leaderboard_has_every_key_and_one_row_per_method_and_target(board):
    b, out = board
    assert json.loads((out / "leaderboard.json").read_text()) == json.loads(json.dumps(b))
    assert [(r["method"], r["target"]) for r in b["rows"]] == [("l1-norm", "2x"), ("tp-taylor", "2x"),
                                                               ("l1-stuck", "2x")]
    for r in b["rows"][:2]:
        assert ROW_KEYS <= set(r)
        assert r["seeds"] == [0, 1] and set(r["metric_per_seed"]) == {"0", "1"}
        assert r["metric_mean"] == pytest.approx(sum(r["metric_per_seed"].values()) / 2)
        assert abs(r["macs_ratio"] - 2.0) <= 0.06  # the independent count, within the 3 % promise
        assert 0 <= r["pruned_metric_mean"] <= 100
        assert set(r["latency"]) == {"eager_b1", "eager_b8"}
        assert {"median", "lo", "hi", "within_noise"} <= set(r["latency"]["eager_b1"])
    assert sum(r["best"] for r in b["rows"]) == 1
    assert b["base"]["sha256"] and b["cells"] == {"done": 4, "total": 6, "failed": ["l1-stuck-2x-s0",
                                                                                   "l1-stuck-2x-s1"]}


def test_a_failed_cell_is_recorded_and_the_others_go_on(board):
    b, out = board
    stuck = b["rows"][2]
    assert stuck["metric_mean"] is None and stuck["seeds"] == []
    assert set(stuck["errors"]) == {"0", "1"} and "l1-norm" in stuck["errors"]["0"]
    assert (out / "errors" / "l1-stuck-2x-s0.json").exists()
    assert "failed" in (out / "leaderboard.md").read_text()


def test_every_cell_is_a_pipeline_run_from_the_same_base_and_split(board):
    b, out = board
    base_split = json.loads((out / "base" / "split.json").read_text())
    for cid in ("l1-norm-2x-s0", "tp-taylor-2x-s1"):
        cfg = yaml.safe_load((out / "cells" / cid / "config.yaml").read_text())
        assert cfg["model"]["checkpoint"] == str(out.absolute() / b["base"]["checkpoint"])  # recorded relative
        assert json.loads((out / "cells" / cid / "split.json").read_text()) == base_split  # seed 1 too
        result = json.loads((out / "results" / f"{cid}.json").read_text())  # the small committed record
        assert result["base_sha256"] == b["base"]["sha256"] and result["after"] == \
            json.loads((out / "cells" / cid / "metrics.json").read_text())["after"]
        assert "/" not in result["config"]["model"]["checkpoint"][:1]  # no absolute path of this machine
        assert (out / "cells" / cid / "metrics.json").exists() and (out / "cells" / cid / "report.html").exists()


def test_a_second_run_retrains_nothing(board):
    b, out = board
    models = sorted(out.rglob("model.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in models}
    t0 = time.perf_counter()
    again = compare.run(copy.deepcopy(SMALL), out=out)
    assert time.perf_counter() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in models} == stamps
    assert [r["metric_per_seed"] for r in again["rows"]] == [r["metric_per_seed"] for r in b["rows"]]


def test_damaged_latency_cache_and_cell_metrics_are_measured_again_not_shown(board):
    b, out = board
    (out / "latency.json").write_text('{"settings": 1, "results": [')  # not JSON
    cell = next(p for p in (out / "cells").iterdir() if p.name.startswith("l1-norm-2x-s0"))
    m = json.loads((cell / "metrics.json").read_text())
    true = m["after"]["top1"]
    m["after"]["top1"] = "99.9"  # a hand edit of the wrong type
    (cell / "metrics.json").write_text(json.dumps(m))
    again = compare.run(copy.deepcopy(SMALL), out=out)
    row = next(r for r in again["rows"] if r["method"] == "l1-norm")
    assert row["metric_per_seed"]["0"] == pytest.approx(true, abs=0.01)  # measured again, not the edit
    m = json.loads((cell / "metrics.json").read_text())
    m["after"]["top1"] = 99.9  # a plausible hand edit, the right type: the signature no longer matches
    (cell / "metrics.json").write_text(json.dumps(m))
    row = next(r for r in compare.run(copy.deepcopy(SMALL), out=out)["rows"] if r["method"] == "l1-norm")
    assert row["metric_per_seed"]["0"] == pytest.approx(true, abs=0.01)
    assert json.loads((out / "latency.json").read_text())["results"]  # rebuilt
    tampered = json.loads((out / "latency.json").read_text())
    for per in tampered["results"].values():
        per["base"]["median_ms"] = 0.0  # all-zero times: not a measurement
    (out / "latency.json").write_text(json.dumps(tampered))
    compare.run(copy.deepcopy(SMALL), out=out)
    assert all(per["base"]["median_ms"] > 0 for per in json.loads((out / "latency.json").read_text())["results"]
               .values())
    plausible = json.loads((out / "latency.json").read_text())
    for per in plausible["results"].values():
        per["base"]["median_ms"] = 12345.0  # well-formed, the model hashes intact: still an edit
    (out / "latency.json").write_text(json.dumps(plausible))
    compare.run(copy.deepcopy(SMALL), out=out)
    assert all(per["base"]["median_ms"] != 12345.0
               for per in json.loads((out / "latency.json").read_text())["results"].values())


def test_an_unsigned_base_metrics_file_is_measured_again_and_board_only_says_why(board):
    b, out = board
    path = out / "base" / "metrics.json"
    m = json.loads(path.read_text())
    m.pop("prunekit_signature")  # as an older prunekit wrote it
    path.write_text(json.dumps(m))
    with pytest.raises(PrunekitError, match="signed its measurements"):
        compare.run(copy.deepcopy(SMALL), out=out, board_only=True)
    models = sorted(out.rglob("model.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in models}
    again = compare.run(copy.deepcopy(SMALL), out=out)  # measures the base again; retrains nothing
    assert {p: p.stat().st_mtime_ns for p in models} == stamps
    assert again["base"][b["metric"]] == pytest.approx(b["base"][b["metric"]], abs=0.01)
    assert "prunekit_signature" in json.loads(path.read_text())
    assert compare.run(copy.deepcopy(SMALL), out=out, board_only=True)["rows"]


def test_another_config_in_the_same_folder_is_refused_with_the_differences(board):
    _, out = board
    with pytest.raises(PrunekitError, match=r"another config \(differs at: budget, seeds\)"):
        compare.run({**copy.deepcopy(SMALL), "seeds": [0], "budget": 2}, out=out)


def test_a_killed_compare_resumes_at_the_cell_where_it_stopped(tmp_path):
    cfg = {**copy.deepcopy(SMALL), "methods": ["l1-norm"], "out": str(tmp_path / "out")}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = tmp_path / "out" / "cells" / "l1-norm-2x-s0" / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", "compare", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.exists(), "the first cell never finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stamp = first.stat().st_mtime_ns
    board = compare.run(path)
    assert first.stat().st_mtime_ns == stamp  # the finished cell was read, not re-run
    assert board["cells"]["done"] == 2 and board["rows"][0]["seeds"] == [0, 1]


def test_methods_sharing_a_regulariser_train_their_sparsify_stage_once_per_seed(tmp_path):
    cfg = {**copy.deepcopy(SMALL), "budget": 2, "targets": [1.5], "seeds": [0], "sparsify": {"epochs": 1},
           "methods": ["net-slim", "imp-sim", {"name": "net-slim", "label": "net-slim-s2", "sparsify": {"s": 2e-3}}]}
    out = tmp_path / "out"
    b = compare.run(cfg, out=out)
    assert b["cells"]["done"] == 3
    shared = sorted(p.name for p in (out / "shared").iterdir())
    assert len(shared) == 2  # one per distinct sparsify stage: the default s (net-slim, imp-sim), and 2e-3

    def stage(cid: str, name: str) -> Path:
        return next((out / "cells" / cid / "stages").glob(f"*-{name}"))

    first, twin = stage("net-slim-1.5x-s0", "sparsify"), stage("imp-sim-1.5x-s0", "sparsify")
    rec, twin_rec = pk.io.safe_load(first / "done.pt"), pk.io.safe_load(twin / "done.pt")
    assert "shared" not in rec and twin_rec["shared"] in shared and twin_rec["epochs"] == 1
    assert pk.io.safe_load(out / "shared" / twin_rec["shared"] / "done.pt")["trained_by"] == "net-slim-1.5x-s0"
    assert pk.io.safe_load(stage("net-slim-s2-1.5x-s0", "sparsify") / "done.pt").get("shared") is None
    assert pk.io.safe_load(stage("imp-sim-1.5x-s0", "finetune") / "done.pt")["epochs"] == 1  # still charged
    # the shared stage is the very model imp-sim trains alone
    alone = yaml.safe_load((out / "cells" / "imp-sim-1.5x-s0" / "config.yaml").read_text())
    alone.update(out=str(tmp_path / "alone"), stages=alone["stages"][:1])
    pipeline.run(alone)
    own = pk.io.load(stage("imp-sim-1.5x-s0", "sparsify") / "model.pt").state_dict()
    trained = pk.io.load(next((tmp_path / "alone" / "stages").glob("*-sparsify")) / "model.pt").state_dict()
    assert own.keys() == trained.keys() and all(torch.equal(own[k], trained[k]) for k in own)


def test_ratio_within_noise_only_when_the_spread_holds_one():
    assert ratio_stats([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.0])["within_noise"] is False
    noisy = ratio_stats([1.0, 1.2, 0.9, 1.1, 0.95], [1.0] * 5)
    assert noisy["within_noise"] is True and noisy["lo"] <= 1.0 <= noisy["hi"]
    assert label(noisy).startswith("within noise") and "x" not in label(noisy).split("(")[0]
    assert label(ratio_stats([3.0] * 3, [1.5] * 3)) == "2.00x (2.00-2.00)"
    slower = ratio_stats([1.0] * 4, [1.5, 1.6, 1.4, 1.5])
    assert slower["within_noise"] is False and slower["median"] < 1  # a real slowdown is shown as one


def test_side_by_side_times_every_model_in_both_runtimes():
    torch.manual_seed(0)
    big = pk.models.create("digits_cnn", in_channels=1)
    small = copy.deepcopy(big)
    pk.prune(small, "l1-norm", torch.randn(2, 1, 8, 8), speedup=4.0)
    res = side_by_side({"base": big, "pruned": small}, torch.randn(1, 1, 8, 8), batch_sizes=(1, 32),
                       threads=1, rounds=5)
    assert set(res) == {"eager_b1", "eager_b32", "ort_b1", "ort_b32"}
    assert res["eager_b32"]["base"]["ratio"]["median"] == 1.0 and res["ort_b1"]["pruned"]["median_ms"] > 0


def test_one_model_is_timed_alone_in_every_runtime_of_the_table():
    """``prunekit eval``'s latency: one timing loop for every runtime row, int8 quantised once per model."""
    from prunekit import runtimes

    model = pk.models.create("digits_cnn", in_channels=1).eval()
    for name in runtimes.names():
        res = sequential(model, torch.randn(3, 1, 8, 8), runtime=name, batch_sizes=(1, 4), repeats=3, threads=1)
        assert set(res) == {"b1", "b4"}, name
        assert all(r["median_ms"] > 0 and r["runtime"] == name and r["threads"] == 1 for r in res.values()), res
    with pytest.raises(pk.PrunekitError, match="unknown runtime 'tensorrt'; allowed: eager"):
        sequential(model, torch.randn(1, 1, 8, 8), runtime="tensorrt")


_RSS_AFTER_FREE = """
import sys, torch
from prunekit import timing
if sys.argv[1] == "timed":
    timing.side_by_side({"m": torch.nn.Linear(2, 2)}, torch.zeros(1, 2), batch_sizes=(1,), runtimes=("eager",),
                        rounds=1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
x = torch.ones(4 << 20)  # 16 MB, touched
del x
print(rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc on Linux: the allocator whose thresholds timing fixes")
def test_timing_keeps_freed_memory_mapped_so_latency_does_not_depend_on_the_process_history():
    """glibc returns a freed 16 MB block to the OS (the next forward page-faults it back); once timing ran,
    the process keeps it, as a warm process would."""
    kept = {flag: int(subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, flag], capture_output=True, text=True,
                                     check=True).stdout) for flag in ("fresh", "timed")}
    assert kept["fresh"] < 4 << 20 and kept["timed"] > 12 << 20, kept


def test_best_row_and_lead_beyond_spread():
    rows = [{"target": "2x", "metric_mean": 90.0, "metric_std": 0.2},
            {"target": "2x", "metric_mean": 89.0, "metric_std": 0.3},
            {"target": "3x", "metric_mean": 80.0, "metric_std": 1.0},
            {"target": "3x", "metric_mean": 79.5, "metric_std": 1.0}]
    compare._mark_best(rows)
    assert [r["best"] for r in rows] == [True, False, True, False]
    assert rows[0]["lead_beyond_spread"] is True and rows[2]["lead_beyond_spread"] is False


@pytest.mark.parametrize("change, expected", [
    ({"methods": ["l1-nrom"]}, "unknown method 'l1-nrom'"),
    ({"methods": [{"name": "l1-norm", "params": {"rankin": "global"}}]}, "no option rankin"),
    ({"methods": [{"name": "tp-taylor", "params": {"batches": 0}}]}, "option batches must be >= 1, got 0"),
    ({"targets": ["learned"]}, "'learned' is for methods that choose their own cut"),
    ({"methods": []}, "the list is empty"),
    ({"seeds": [0, "one"]}, "integers"),
    ({"seeds": [-1]}, "integers in [0, 2^32)"),
    ({"targets": [0.5]}, "neither a speedup > 1"),
    ({"methods": [{"name": "net-slim", "sparsify": {"epochs": 3}}]}, "do not fit the budget of 1"),
    ({"methods": [{"name": "net-slim", "sparsify": {"s": -1}}]}, "compare cell"),
    ({"methods": ["magnitude"]}, "unstructured"),
    ({"finetune": {"epochs": 3}}, "budget"),
    ({"bogus": 1}, "unknown key"),
    ({"targets": [{"latency": 2.0, "runtme": "eager"}]}, "unknown key 'runtme'"),
    ({"targets": [{"latency": 0.5}]}, "'target.latency': must be a finite number > 1"),
    ({"methods": [{"name": "adaptive-slim", "targets": [{"latency": 2.0}]}]},
     "is adaptive: a latency target needs a method that removes channels to a target: give this entry"),
])
def test_bad_compare_configs_fail_before_any_training(change, expected, tmp_path):
    cfg = {**copy.deepcopy(SMALL), **change, "out": str(tmp_path / "out")}
    with pytest.raises(PrunekitError, match=re.escape(expected)):
        compare.run(cfg)
    assert not (tmp_path / "out").exists()


def test_a_latency_target_is_a_cell_pruned_to_a_measured_speedup(tmp_path):
    cfg = compare.validate({**copy.deepcopy(SMALL), "out": str(tmp_path / "out"),
                            "targets": [2.0, {"latency": 1.5, "runtime": "onnxruntime", "batch": 8, "threads": 1}]})
    cells = compare._cells(cfg, compare._entries(cfg), Path(cfg["out"]))
    lat = [c for c in cells if c["target"].startswith("lat")]
    assert {c["target"] for c in lat} == {"lat1.5x-ort-b8-t1"} and len(lat) == 3 * 2
    assert lat[0]["config"]["target"] == {"latency": 1.5, "runtime": "onnxruntime", "batch": 8, "threads": 1}
    assert lat[0]["id"] == "l1-norm-lat1.5x-ort-b8-t1-s0"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_leaderboard_html_renders_in_headless_chromium(board, tmp_path):
    _, out = board
    page = (out / "leaderboard.html").read_text()
    assert "http://" not in page and "https://" not in page
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.setAttribute('data-decoded',im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length);"
             "});</script></body>")
    probe.write_text(page.replace("</body>", check))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert "prunekit compare — cmp-test" in dom and "tp-taylor" in dom, r.stderr[-500:]
    m = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) == "2"


def test_tp_group_norm_regulariser_pulls_only_prunable_groups():
    torch.manual_seed(0)
    model = pk.models.create("resnet20")
    model.prunekit_arch["input_shape"] = [3, 32, 32]
    m = methods.get("tp-group-norm")
    hook = m.regularizer(model, m.check_regularizer_options({"reg": 1e-2}), 10, torch.zeros(1, 3, 32, 32))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    hook(model)
    pulled = {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
    assert "conv1.weight" in pulled and "layer1.0.bn1.weight" in pulled
    assert "linear.bias" not in pulled  # the classifier's outputs are never a group


def test_tp_methods_reach_the_target_with_the_output_shape_kept():
    """The ranking is Torch-Pruning's, the surgery prunekit's (exactness: tests/test_patterns.py)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for name, kw in (("tp-taylor", {"data": [(x, y)]}), ("tp-group-norm", {})):
        model = pk.models.create("resnet20")
        res = pk.prune(model, name, x, speedup=2.0, **kw)
        assert abs(res.speedup - 2.0) <= 0.06
        assert model(x).shape == (16, 10)
