"""``mechvlm report --resume``: killed mid-run (SIGTERM, SIGKILL), resumed, the same
results.json as an uninterrupted run; another model, TSV or setting is refused.

The killed run is the real command line in a subprocess. Its MMBench batches are slowed
(a sleep before each generation, patched in by the test) so that the kill lands in the
middle of the knockout loop; the test waits until the journal holds some of its batches.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechvlm.journal import ResumeRefused
from mechvlm.outdir import OutputExistsError
from mechvlm.report import ReportConfig, run_report
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED

pytestmark = pytest.mark.slow  # a subprocess per kill (CI runs the slow group too)
CONDITIONS = ("none", "text→image:pre_softmax_mask")
LIMIT, BATCH = 10, 2  # 5 batches per loop: 2 metric loops + 2 conditions = 20 units
SLOWED_CLI = """
import importlib, sys, time
sharing = importlib.import_module("mechvlm.prefix_sharing")  # where evaluate's generation runs
generate = sharing.greedy_generate
def slowed(*args, **kwargs):
    time.sleep(0.3)
    return generate(*args, **kwargs)
sharing.greedy_generate = slowed
from mechvlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Copies of the shipped toy model and TSV (the refusal checks edit them)."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(SHIPPED["qwen2_5_vl"], root / "model")
    shutil.copy(SHIPPED_TSV, root / "bench.tsv")
    return root


def config(inputs: Path, out: Path, **kw) -> ReportConfig:
    kw = {"limit": LIMIT, "batch_size": BATCH, "conditions": CONDITIONS, "progress": False, "examples": 0, **kw}
    return ReportConfig(model=str(inputs / "model"), mmbench=str(inputs / "bench.tsv"), out=str(out), **kw)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_report(config(inputs, out))
    return json.loads((out / "results.json").read_text())


def comparable(results):
    """The results without what describes the run rather than its numbers: wall times,
    the run-info footer and ``out`` / ``resume``."""
    if isinstance(results, dict):
        return {k: comparable(v) for k, v in results.items() if k not in ("wall_s", "run", "out", "resume")}
    if isinstance(results, list):
        return [comparable(v) for v in results]
    return results


def journal_units(out: Path) -> dict[tuple[str, int], int]:
    """``{(task, unit): times it was completely written}`` over the journal's files."""
    rows: dict[tuple[str, int], list] = {}
    complete: dict[tuple[str, int], int] = {}
    for path in (out / "journal").glob("rank-*.jsonl"):
        for raw in path.read_bytes().splitlines(keepends=True)[1:]:
            if not raw.endswith(b"\n"):
                continue  # the torn tail of a killed write
            row = json.loads(raw)
            key = (row["task"], row["unit"])
            rows.setdefault(key, []).append(row["row"])
            if row["row"] == row["n"] - 1:
                complete[key] = complete.get(key, 0) + 1
    return complete


def kill_mid_run(inputs: Path, out: Path, sig: int) -> dict:
    """Start ``mechvlm report``, kill it with ``sig`` once the journal holds two MMBench
    batches, and return the complete units it left."""
    args = ["report", "--model", str(inputs / "model"), "--mmbench", str(inputs / "bench.tsv"), "--out", str(out),
            "--limit", str(LIMIT), "--batch-size", str(BATCH), "--conditions", ",".join(CONDITIONS),
            "--examples", "0", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOWED_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    journal = out / "journal" / "rank-000.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b'"task": "model/knockout/none"') >= 2 * BATCH:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err.decode()[-2000:]
    assert not (out / "results.json").exists()
    done = journal_units(out)
    assert 2 <= sum(1 for task, _ in done if task == "model/knockout/none") < LIMIT // BATCH  # mid-run
    return done


def resume_and_compare(inputs: Path, out: Path, done_at_kill: dict, uninterrupted: dict) -> None:
    resumed = run_report(config(inputs, out, resume=True))
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(uninterrupted)
    assert resumed["knockout"]["none"]["items"] == uninterrupted["knockout"]["none"]["items"]
    after = journal_units(out)
    assert len(after) == 4 * (LIMIT // BATCH)  # every unit of every loop is recorded ...
    assert all(after[key] == 1 for key in done_at_kill)  # ... and none done before the kill was recomputed


def test_sigterm_mid_run_then_resume(inputs, uninterrupted, tmp_path):
    out = tmp_path / "report"
    done = kill_mid_run(inputs, out, signal.SIGTERM)
    with pytest.raises(OutputExistsError, match="pass --resume to continue it"):
        run_report(config(inputs, out))  # without --resume the interrupted journal is not taken over
    resume_and_compare(inputs, out, done, uninterrupted)


def test_sigkill_mid_run_then_resume_and_changed_runs_are_refused(inputs, uninterrupted, tmp_path):
    out = tmp_path / "report"
    done = kill_mid_run(inputs, out, signal.SIGKILL)
    with pytest.raises(ResumeRefused, match=r"settings \(batch_size: 2 -> 5\)"):
        run_report(config(inputs, out, resume=True, batch_size=5))
    with pytest.raises(ResumeRefused, match=r"settings \(conditions"):
        run_report(config(inputs, out, resume=True, conditions=("none",)))
    tsv = inputs / "bench.tsv"
    original = tsv.read_bytes()
    tsv.write_bytes(original.rstrip(b"\n") + b" \n")  # the last row (not among the items run) changed
    try:
        with pytest.raises(ResumeRefused, match="mmbench"):
            run_report(config(inputs, out, resume=True))
    finally:
        tsv.write_bytes(original)
    cfg_file = inputs / "model" / "config.json"
    original = cfg_file.read_bytes()
    cfg_file.write_bytes(original + b"\n")
    try:
        with pytest.raises(ResumeRefused, match="model"):
            run_report(config(inputs, out, resume=True))
    finally:
        cfg_file.write_bytes(original)
    resume_and_compare(inputs, out, done, uninterrupted)
