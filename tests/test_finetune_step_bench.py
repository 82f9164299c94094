"""benchmarks/finetune_step.py runs (quick mode: a tiny model on CPU, no results written)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_finetune_step_benchmark_quick():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune_step.py"), "--quick", "--no-write"],
                         capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mask_16/plain_16: paired" in run.stdout and "tok/s" in run.stdout
