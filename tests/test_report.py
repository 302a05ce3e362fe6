"""Reports: self-contained HTML (checked in headless Chromium) and the same content as Markdown."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prunekit.errors import PrunekitError
from prunekit.pipeline import run
from prunekit.report import write_report

from .test_pipeline import BASE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for method, speedup in (("net-slim", 2.0), ("dist-fit", 1.6)):
        cfg = copy.deepcopy(BASE)
        cfg.update(name=f"digits-{method}", out=str(root / method), method={"name": method},
                   target={"speedup": speedup})
        cfg["stages"][0]["epochs"] = 2
        cfg["stages"][2]["epochs"] = 1
        run(cfg)
        dirs.append(root / method)
    return dirs


def test_markdown_and_html_hold_the_same_content(two_runs):
    html_path, md_path = write_report(two_runs, two_runs[0].parent / "cmp")
    md = md_path.read_text()
    page = html_path.read_text()
    for text in ("digits-net-slim", "digits-dist-fit", "MACs", "top-1 (%)"):
        assert text in md and text in page
    images_md = re.findall(r"!\[[^]]*\]\((report_files/[^)]+\.png)\)", md)
    assert {"digits-net-slim-gamma", "digits-dist-fit-norms", "curves", "tradeoff"} <= {
        Path(p).stem for p in images_md}
    for p in images_md:
        assert (md_path.parent / p).stat().st_size > 1000
    assert page.count("data:image/png;base64,") == len(images_md)
    assert "http://" not in page and "https://" not in page  # nothing to fetch


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_html_renders_in_headless_chromium(two_runs, tmp_path):
    html_path, _ = write_report(two_runs, tmp_path / "cmp")
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.setAttribute('data-decoded',im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length);"
             "});</script></body>")
    probe.write_text(html_path.read_text().replace("</body>", check))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                        probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert "<title>prunekit report — digits-net-slim, digits-dist-fit</title>" in dom, r.stderr[-500:]
    assert "top-1 (%)" in dom and "digits-dist-fit" in dom
    m = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 5, m and m.group(0)


def test_unfinished_run_is_refused(tmp_path):
    with pytest.raises(PrunekitError, match="not a finished prunekit run"):
        write_report([tmp_path])


def test_the_report_shows_every_stage_and_the_base_before_sparsity(tmp_path):
    """A sparsify stage's cost shows: 'base' is the model before it, and each stage has its row."""
    cfg = copy.deepcopy(BASE)
    cfg.update(name="digits-ns", out=str(tmp_path / "ns"), method={"name": "net-slim"}, target={"speedup": 1.5})
    cfg["stages"] = [{"stage": "train", "epochs": 2, "lr": 0.1, "label_smoothing": 0.0},
                     {"stage": "sparsify", "epochs": 1, "lr": 0.02, "s": 0.01, "schedule": "constant"},
                     {"stage": "prune"}, {"stage": "finetune", "epochs": 1, "lr": 0.05}]
    metrics = run(cfg)
    md = (tmp_path / "ns" / "report.md").read_text()
    assert "## Stages of digits-ns" in md
    for stage in ("01-train", "02-sparsify", "03-prune", "04-finetune"):
        assert f"| {stage} |" in md
    import prunekit as pk
    from prunekit.train import evaluate

    digits = pk.data.load("digits")
    trained = pk.load(tmp_path / "ns" / "stages" / "01-train" / "model.pt")
    base_top1 = evaluate(trained, digits.eval_loader(digits.test, 256))["top1"]
    assert metrics["before"]["top1"] == base_top1  # the base is the trained model, before sparsity training
    assert "base: the model before any sparsity training" in md
