"""Notebook housekeeping: build a notebook from a percent-format script, strip outputs, check.

    python scripts/notebooks.py from-py notebooks/src.py notebooks/NN_name.ipynb
    python scripts/notebooks.py strip notebooks/*.ipynb     # drop outputs and execution counts
    python scripts/notebooks.py check notebooks/*.ipynb     # exit 1 if any is stored with outputs
    python scripts/notebooks.py index                       # rewrite the notebook index in README.md

A percent-format script separates cells with ``# %%`` lines; ``# %% [markdown]`` starts a
markdown cell whose lines are written as ``# text`` comments. Notebooks are stored without
outputs so that diffs stay readable; ``tests/test_notebooks.py`` executes every notebook in
``notebooks/`` (offline, on the shipped toys) and fails on any stored output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mechvlm.fileio import write_text  # noqa: E402


def from_py(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    kind, lines = None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        elif text:
            nb.cells.append(nbformat.v4.new_code_cell(text))

    for line in src.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return nb


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def has_outputs(nb: nbformat.NotebookNode) -> bool:
    return any(c.cell_type == "code" and (c.outputs or c.execution_count is not None) for c in nb.cells)


def write(nb: nbformat.NotebookNode, path: str | Path) -> None:
    write_text(path, nbformat.writes(nb) + "\n")


ROOT = Path(__file__).resolve().parent.parent
INDEX_START, INDEX_END = "<!-- notebooks:start -->", "<!-- notebooks:end -->"


def title_of(nb: nbformat.NotebookNode) -> str:
    """The first markdown heading of the notebook."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    raise ValueError("a notebook must start with a markdown heading (its title)")


def readme_index(root: Path = ROOT) -> str:
    """The README's notebook list: one line per ``notebooks/*.ipynb``, in file order."""
    lines = [f"- [{title_of(nbformat.read(p, as_version=4))}](notebooks/{p.name})"
             for p in sorted((root / "notebooks").glob("*.ipynb"))]
    return "\n".join([INDEX_START, *lines, INDEX_END])


def with_index(readme: str, root: Path = ROOT) -> str:
    """``readme`` with the text between the index markers replaced by `readme_index`."""
    if INDEX_START not in readme or INDEX_END not in readme:
        raise ValueError(f"README.md has no {INDEX_START} ... {INDEX_END} block")
    head, rest = readme.split(INDEX_START, 1)
    return head + readme_index(root) + rest.split(INDEX_END, 1)[1]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("from-py", "strip", "check", "index"):
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "index":
        readme = ROOT / "README.md"
        write_text(readme, with_index(readme.read_text(encoding="utf-8")))
        return 0
    if cmd == "from-py":
        if len(args) != 2:
            print("usage: notebooks.py from-py SRC.py OUT.ipynb")
            return 2
        write(from_py(Path(args[0]).read_text()), args[1])
        return 0
    bad = 0
    for p in args:
        nb = nbformat.read(p, as_version=4)
        if cmd == "strip":
            write(strip(nb), p)
        elif has_outputs(nb):
            print(f"{p}: stored with outputs (run: python scripts/notebooks.py strip {p})")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
