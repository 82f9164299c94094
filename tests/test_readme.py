"""Every ```python block of README.md runs as written, in order, in one namespace (offline, in a
temporary directory). A block that needs a real checkpoint, a GPU or the user's data is
preceded by ``<!-- readme-test: skip (reason) -->`` and is not run; the test lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every python block."""
    out = []
    for m in _BLOCK.finditer(text):
        line = text[:m.start("code")].count("\n") + 1
        skip = re.search(r"<!-- readme-test: skip \((.*)\) -->", m.group("before"))
        out.append((line, m.group("code"), skip.group(1) if skip else None))
    return out


def test_extractor_sees_skips_and_blocks():
    text = "a\n```python\nx = 1\n```\n<!-- readme-test: skip (gpu) -->\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1", None), (7, "y = 2", "gpu")]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    run = [b for b in blocks if b[2] is None]
    assert run, "README.md has no runnable python block"
    namespace: dict = {"__name__": "__readme__"}
    for line, code, _ in run:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README.md python block at line {line} failed: {type(e).__name__}: {e}") from e
