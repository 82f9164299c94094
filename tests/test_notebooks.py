"""Every notebook in notebooks/ runs top to bottom, offline, on the shipped toys, and is
stored without outputs.

Each notebook is executed by nbclient in a fresh kernel with ``HF_HUB_OFFLINE=1`` and a
temporary working directory (a notebook writes only there). A per-notebook budget keeps the
set within CI's time: a cell over ``CELL_TIMEOUT`` seconds, or a notebook over
``NOTEBOOK_TIMEOUT``, fails the test. README.md's notebook index must list every notebook.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300
# a notebook over this fails (pytest-timeout); the planned five take about a minute each on 2
# CPU cores, so the set stays well under CI's 10-minute budget for notebooks
NOTEBOOK_TIMEOUT = 360

_spec = importlib.util.spec_from_file_location("nbtool", ROOT / "scripts" / "notebooks.py")
nbtool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbtool)


def execute(nb, cwd: Path) -> None:
    env_before = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", TQDM_DISABLE="1",
                      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    execute(nb, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert not nbtool.has_outputs(nb), f"strip it: python scripts/notebooks.py strip {path}"


def test_the_harness_fails_a_failing_notebook(tmp_path):
    good = nbtool.from_py("# %% [markdown]\n# # title\n# %%\nx = 2 + 2\n# %%\nassert x == 4\n"
                          "open('written.txt', 'w').write('ok')\n")
    execute(good, tmp_path)
    assert (tmp_path / "written.txt").read_text() == "ok"  # ran in the temporary folder
    assert good.cells[0].cell_type == "markdown" and good.cells[0].source == "# title"
    bad = nbtool.from_py("# %%\nraise ValueError('boom')\n")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="boom"):
        execute(bad, tmp_path)
    assert nbtool.has_outputs(bad) and not nbtool.has_outputs(nbtool.strip(bad))


def test_no_notebook_names_collide():
    numbers = [p.name.split("_", 1)[0] for p in NOTEBOOKS]
    assert len(numbers) == len(set(numbers)), numbers
    assert sys.version_info >= (3, 11)


def test_readme_indexes_every_notebook():
    """README.md lists exactly the notebooks in notebooks/ (titles from their first heading);
    a notebook added without its line fails here: run `python scripts/notebooks.py index`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert nbtool.with_index(readme) == readme, "run: python scripts/notebooks.py index"
    links = re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", readme)
    assert sorted(links) == sorted(f"notebooks/{p.name}" for p in NOTEBOOKS)
    assert all((ROOT / link).is_file() for link in links)
