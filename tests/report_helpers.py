"""One computation of the two shipped toys' report parts, shared by the report and browser
tests (computed once per test process)."""

from __future__ import annotations

import dataclasses
import tempfile
from functools import lru_cache
from pathlib import Path

from mechvlm.report.run import ReportConfig, compute_runs

LIMIT = 8


@lru_cache(maxsize=1)
def toy_runs():
    """``(cfg, items, runs, info)`` of the default report (both shipped toys) on the first
    ``LIMIT`` rows, with the logit-lens section."""
    out = Path(tempfile.mkdtemp(prefix="mechvlm-report-test-"))
    cfg = ReportConfig(limit=LIMIT, batch_size=4, progress=False, analyses=("logit_lens",), out=str(out / "r"))
    items, runs, info = compute_runs(cfg)
    return cfg, items, runs, info


def relabelled(runs, labels):
    """The runs under other labels (a page of more models without computing them again)."""
    base = [runs[i % len(runs)] for i in range(len(labels))]
    return [dataclasses.replace(r, label=label) for r, label in zip(base, labels)]
