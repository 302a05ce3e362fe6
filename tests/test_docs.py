"""The README stays short and true, and the documentation site builds (issue 34)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), not images


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown file, up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _readme_test_command() -> str:
    """The command of the code block in "Two commands" that runs the test suite."""
    blocks = re.findall(r"^```bash\n(.*?)^```", _section(_readme(), "Two commands"), flags=re.M | re.S)
    commands = [b.strip() for b in blocks if "pytest" in b]
    assert len(commands) == 1, f"expected one test command in 'Two commands', found {commands}"
    assert "\n" not in commands[0], "the test command is one line"
    return commands[0]


def _ci_command() -> str:
    """The last line of .ci/run that starts with 'python3 -m venv'."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    commands = [ln for ln in lines if ln.startswith("python3 -m venv")]
    assert commands, ".ci/run has no line starting with 'python3 -m venv'"
    return commands[-1]


def _nav_pages(nav: object) -> list[str]:
    """Every page file named in an mkdocs nav (nested sections included)."""
    if isinstance(nav, str):
        return [] if re.match(r"^[a-z]+://", nav) else [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !ENV / !relative tags: read them as plain values
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_readme_reads_in_five_minutes():
    n = len(_readme().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move reference into docs/"


def test_readme_test_command_is_what_ci_runs():
    assert _readme_test_command() == _ci_command()


def test_readme_relative_links_exist():
    targets = LINK.findall(_readme())
    assert targets, "README.md links no documentation page"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue  # http(s)://, mailto:, an anchor in the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_is_in_the_nav_and_exists():
    config = _mkdocs_config()
    docs = ROOT / config.get("docs_dir", "docs")
    pages = _nav_pages(config["nav"])
    assert pages, "mkdocs.yml has no nav"
    assert [p for p in pages if not (docs / p).is_file()] == []
    assert sorted(p.name for p in docs.glob("*.md")) == sorted(set(pages)), "every docs/*.md page is in the nav"


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in _nav_pages(_mkdocs_config()["nav"]):
        built = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert built.is_file(), f"{page} was not built"
