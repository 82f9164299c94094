"""Files: nothing lost, nothing half-written, nothing of the user's overwritten.

Before issue 12 every writer opened its target with ``open(path, "w")`` (a full disk or an
interrupt left a truncated file), `mechvlm report --out` overwrote a user's results.json,
make-mmbench and train-toy replaced what was there, and an unwritable ``--out`` failed
only after the whole compute."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

from mechvlm.cli import main
from mechvlm.outdir import MANIFEST_NAME, OutputExistsError, OutputNotWritableError, read_manifest

REPORT_ARGS = ["--limit", "2", "--batch-size", "2", "--conditions", "none", "--no-progress"]


class _FullDisk:
    """File objects whose writes fail with ENOSPC once ``limit`` bytes went to a file whose
    name contains ``target`` (through ``open``, ``io.open``/``Path.write_text`` and
    ``os.fdopen``, the three ways Python code opens a file for writing)."""

    def __init__(self, monkeypatch, target: str, limit: int = 10):
        self.target, self.limit, self.hits = target, limit, 0
        real_open, real_fdopen = builtins.open, os.fdopen
        disk = self

        class Wrapped:
            def __init__(self, f, name):
                self._f, self._name, self._n = f, name, 0

            def write(self, data):
                if disk.target in os.path.basename(self._name):
                    if self._n + len(data) > disk.limit:
                        disk.hits += 1
                        self._f.write(data[: max(0, disk.limit - self._n)])
                        raise OSError(errno.ENOSPC, "No space left on device (simulated)")
                    self._n += len(data)
                return self._f.write(data)

            def __getattr__(self, k):
                return getattr(self._f, k)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __iter__(self):
                return iter(self._f)

        def fake_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            return Wrapped(f, str(file)) if any(c in mode for c in "wax+") and not isinstance(file, int) else f

        def fake_fdopen(fd, mode="r", *a, **k):
            name = os.readlink(f"/proc/self/fd/{fd}")
            f = real_fdopen(fd, mode, *a, **k)
            return Wrapped(f, name) if any(c in mode for c in "wax+") else f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "fdopen", fake_fdopen)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_model(monkeypatch):
    from mechvlm import HookedVLM

    def refuse(cls, *a, **k):
        raise AssertionError("compute started before --out was checked")

    monkeypatch.setattr(HookedVLM, "from_pretrained", classmethod(refuse))


# --- atomic writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["results.json", "report.html"])  # the first and the last file written
def test_report_rerun_on_a_full_disk_keeps_every_previous_file(tmp_path, monkeypatch, target):
    out = tmp_path / "r"
    assert main(["report", "--out", str(out), *REPORT_ARGS]) == 0
    before = _snapshot(out)
    assert {"report.html", "results.json", "mmbench_items.csv"} <= set(before)
    # a rerun into the folder mechvlm wrote needs no --overwrite (the manifest lists its files)
    disk = _FullDisk(monkeypatch, target)
    with pytest.raises(OSError, match="No space left"):
        main(["report", "--out", str(out), *REPORT_ARGS])
    assert disk.hits == 1
    after = _snapshot(out)
    assert after[target] == before[target]  # the file being written when the disk filled is the old one
    for name, data in after.items():
        if name.endswith(".json"):
            json.loads(data)  # every file is whole
    assert after["report.html"].rstrip().endswith(b"</html>")
    assert set(after) == set(before) and MANIFEST_NAME in after  # no temporary file left behind


def test_mmbench_results_on_a_full_disk(tmp_path, monkeypatch):
    from mechvlm.mmbench import save_results

    def results(raw):
        items = [{"index": i, "answer": "A", "prediction": "A", "kind": "letter", "raw": raw} for i in range(50)]
        return {"none": {"accuracy": 1.0, "std": 0.0, "n": 50, "items": items, "condition": {"name": "none"}}}

    paths = save_results(results("first"), tmp_path)
    before = _snapshot(tmp_path)
    for target in ("mmbench.json", "mmbench_items.csv", "mmbench_summary.csv"):
        with monkeypatch.context() as m:
            _FullDisk(m, target, limit=200)
            with pytest.raises(OSError, match="No space left"):
                save_results(results("second" * 10), tmp_path)
        assert _snapshot(tmp_path)[target] == before[target], target
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths.values())


def test_tsv_writers_on_a_full_disk(tmp_path, monkeypatch):
    from mechvlm.mmbench import load_mmbench, write_mmbench
    from mechvlm.toy.benchmark import SHIPPED_TSV, write_benchmark

    out = tmp_path / "bench.tsv"
    write_benchmark(out, n_questions=4)
    before = out.read_bytes()
    _FullDisk(monkeypatch, "bench.tsv", limit=500)
    with pytest.raises(OSError, match="No space left"):
        write_benchmark(out, n_questions=8, seed=1)
    with pytest.raises(OSError, match="No space left"):
        write_mmbench(load_mmbench(SHIPPED_TSV)[:8], out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["bench.tsv"]


def test_page_save_on_a_full_disk(tmp_path, monkeypatch):
    from mechvlm.viz import Page

    p = tmp_path / "page.html"
    Page("first").add_text("one").save(p)
    before = p.read_bytes()
    _FullDisk(monkeypatch, "page.html")
    with pytest.raises(OSError, match="No space left"):
        Page("second").add_text("two" * 100).save(p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["page.html"]


def test_toy_checkpoint_save_interrupted_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from mechvlm.toy.checkpoint import build_toy, save_toy

    sizes = dict(d_model=32, n_layers=1, d_mlp=64, vision_hidden=32, vision_depth=1, n_heads=2, n_kv_heads=1)
    torch.manual_seed(0)
    first = build_toy("gemma3", **sizes)
    out = save_toy(*first, tmp_path / "toy", record={"run": 1})
    before = _snapshot(out)
    torch.manual_seed(1)
    model, tok, proc = build_toy("gemma3", **sizes)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(proc, "save_pretrained", interrupted)  # after the weights, before the rest
    with pytest.raises(KeyboardInterrupt):
        save_toy(model, tok, proc, out, record={"run": 2})
    assert _snapshot(out) == before
    assert os.listdir(tmp_path) == ["toy"]  # no temporary folder left


# --- --out refuses what mechvlm did not write ---------------------------------------------------

def test_report_refuses_a_folder_with_the_users_files(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"my": "results"}')
    _no_model(monkeypatch)
    with pytest.raises(OutputExistsError, match=r"holds 1 file\(s\) mechvlm did not write.*results\.json.*--overwrite"):
        main(["report", "--out", str(out), *REPORT_ARGS])
    assert (out / "results.json").read_text() == '{"my": "results"}'


def test_report_overwrite_and_a_changed_report(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"my": "results"}')
    (out / "notes.txt").write_text("my notes")
    assert main(["report", "--out", str(out), "--overwrite", *REPORT_ARGS]) == 0
    assert json.loads((out / "results.json").read_text())["n_items"] == 2
    manifest = read_manifest(out)
    assert {"report.html", "results.json", "mmbench.json", "mmbench_items.csv", "mmbench_summary.csv"} <= set(manifest)
    assert "notes.txt" not in manifest  # still the user's
    # a file mechvlm wrote and the user changed since is the user's now
    with open(out / "report.html", "a", encoding="utf-8") as f:
        f.write("<!-- my edit -->")
    with pytest.raises(OutputExistsError, match=r"notes\.txt, report\.html"):
        main(["report", "--out", str(out), *REPORT_ARGS])


def test_unwritable_out_fails_before_any_compute(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _no_model(monkeypatch)
    with pytest.raises(OutputNotWritableError, match=r"--out .*a-file/sub: the folder cannot be written"):
        main(["report", "--out", str(blocker / "sub"), *REPORT_ARGS])
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        main(["report", "--out", str(blocker), *REPORT_ARGS])
    with pytest.raises(OutputNotWritableError, match="cannot be written"):
        main(["make-mmbench", "--out", str(blocker / "b.tsv"), "--questions", "2"])


def test_make_mmbench_refuses_an_existing_file(tmp_path):
    out = tmp_path / "bench.tsv"
    out.write_text("my data")
    with pytest.raises(OutputExistsError, match=r"bench\.tsv exists.*--overwrite"):
        main(["make-mmbench", "--out", str(out), "--questions", "2"])
    assert out.read_text() == "my data"
    assert main(["make-mmbench", "--out", str(out), "--questions", "2", "--overwrite"]) == 0
    assert out.read_text().startswith("index\tquestion")


def test_train_toy_refuses_a_folder_with_the_users_files(tmp_path):
    from mechvlm.toy.train import main as train_main

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"mine")
    tiny = ["--steps", "10", "--eval-every", "10", "--batch-size", "2", "--d-model", "32", "--n-layers", "1",
            "--d-mlp", "64", "--vision-hidden", "32", "--vision-depth", "1"]
    with pytest.raises(OutputExistsError, match=r"weights\.bin"):
        train_main(["--family", "gemma3", "--out", str(out), *tiny])
    assert (out / "weights.bin").read_bytes() == b"mine"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritableError, match="cannot be written"):
        train_main(["--family", "gemma3", "--out", str(blocker / "ckpt"), *tiny])
