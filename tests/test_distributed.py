"""Data-parallel runs on torch.distributed (gloo on CPU, 2 processes under ``torchrun``):
sharded results equal one-process results exactly.

* ``torchrun --nproc-per-node 2 -m mechvlm report``: the same results.json (predictions,
  metrics) and item CSV as one process; resumed afterwards by one process, nothing is
  recomputed.
* The metrics' Python API under an initialised group (tests/_distributed_worker.py): every
  rank returns the one-process attention share, received attention, logit lens,
  similarity, token budget, token contribution and head attribution; ranks passing different batches, or one rank failing, raise on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_worker import build, metrics

from mechvlm.report import ReportConfig, run_report
from mechvlm.toy.checkpoint import SHIPPED

pytestmark = pytest.mark.slow  # each test starts three Python processes (CI runs the slow group too)
TESTS = Path(__file__).resolve().parent
CONDITIONS = ("none", "text→image:pre_softmax_mask")
MODEL = SHIPPED["qwen2_5_vl"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_same(a, b, where="") -> None:
    """Exactly equal: tensors element for element (NaN where NaN), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True, where
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) if a.is_floating_point() else torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _without_run_details(results):
    """The results without what describes the run rather than its numbers: wall times,
    the run-info footer (threads, command line) and ``out`` / ``resume``."""
    if isinstance(results, dict):
        return {k: _without_run_details(v) for k, v in results.items()
                if k not in ("wall_s", "run", "out", "resume")}
    if isinstance(results, list):
        return [_without_run_details(v) for v in results]
    return results


def test_two_rank_report_equals_the_one_process_report(tmp_path):
    args = ["--model", str(MODEL), "--limit", "8", "--batch-size", "3", "--conditions", ",".join(CONDITIONS),
            "--examples", "2", "--no-progress"]
    torchrun("-m", "mechvlm", "report", "--out", str(tmp_path / "two"), *args)
    one = run_report(ReportConfig(models=(str(MODEL),), out=str(tmp_path / "one"), limit=8, batch_size=3,
                                  conditions=CONDITIONS, examples=2, progress=False))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    want = json.loads((tmp_path / "one" / "results.json").read_text())
    assert _without_run_details(two) == _without_run_details(want)  # predictions, metrics (JSON's 6 digits)
    assert (tmp_path / "two" / "mmbench_items.csv").read_bytes() == (tmp_path / "one" / "mmbench_items.csv").read_bytes()
    assert [r["prediction"] for r in two["knockout"]["none"]["items"]] == \
        [r["prediction"] for r in one["knockout"]["none"]["items"]]
    units = {}  # each rank journaled its share of the batches: rank r has units r, r + 2, ...
    for rank in (0, 1):
        for line in (tmp_path / "two" / "journal" / f"rank-{rank:03d}.jsonl").read_text().splitlines()[1:]:
            row = json.loads(line)
            units.setdefault(row["task"], {})[row["unit"]] = rank
    assert units["toy_qwen2_5_vl/attention_share"] == {0: 0, 1: 1, 2: 0}
    assert units["toy_qwen2_5_vl/knockout/none"] == {0: 0, 1: 1, 2: 0}
    # resumed by one process: every batch is read back from the two ranks' files
    before = [p.read_bytes() for p in sorted((tmp_path / "two" / "journal").glob("*.jsonl"))]
    again = run_report(ReportConfig(models=(str(MODEL),), out=str(tmp_path / "two"), limit=8, batch_size=3,
                                    conditions=CONDITIONS, examples=2, progress=False, resume=True))
    assert [p.read_bytes() for p in sorted((tmp_path / "two" / "journal").glob("*.jsonl"))] == before
    assert _without_run_details(json.loads((tmp_path / "two" / "results.json").read_text())) == \
        _without_run_details(want)
    assert again["knockout"]["none"]["items"] == one["knockout"]["none"]["items"]


def test_two_rank_metrics_equal_one_process(tmp_path):
    torchrun(str(TESTS / "_distributed_worker.py"), str(tmp_path / "got"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): a CPU matmul's sums depend on the thread count
    try:
        model, batches = build()
        want = metrics(model, batches)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"got.rank{rank}.pt", weights_only=False)
        assert_same(got["metrics"], want, f"rank {rank}")
        assert "ranks passed different work" in got["different_work"]
        assert got["local"] == [(0, (0, 1)), (1, (0, 1)), (2, (0, 1))]
    r0 = torch.load(tmp_path / "got.rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "got.rank1.pt", weights_only=False)
    assert r1["failure"].startswith("ZeroDivisionError")
    assert r0["failure"].startswith("RankFailed: rank 1 failed: ZeroDivisionError")
