"""The user guide builds (mkdocs --strict), lists every page, and links only to what exists;
README.md and docs/ name no file outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for x in node:
                yield from walk(x)
        elif isinstance(node, dict):
            for x in node.values():
                yield from walk(x)

    return list(walk(cfg["nav"]))


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages()
    missing = [p for p in DOCS if p not in nav]
    assert not missing, f"add these pages to nav in mkdocs.yml: {missing}"
    assert all((ROOT / "docs" / p).is_file() for p in nav)


@pytest.mark.parametrize("doc", ["README.md", *[f"docs/{p}" for p in DOCS]])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not links
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        assert (path.parent / target).exists(), f"{doc}: broken link {target}"


@pytest.mark.parametrize("doc", ["README.md", *[f"docs/{p}" for p in DOCS]])
def test_no_reference_to_files_outside_the_repository(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    for name in ("TOY_MODEL_NOTES", "METHODS.md", "METHODS §", "UPSTREAM_NOTES", "ROADMAP.md", "/work/"):
        assert name not in text, f"{doc} refers to {name}, which is not in the repository"


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "analyses" / "attention_share" / "index.html").is_file()
