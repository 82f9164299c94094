"""The generation and post-softmax-knockout benchmarks run end to end in ``--quick`` mode (tiny
models, nothing written): their correctness rows hold (mechvlm's tokens equal HF
``generate``'s, with and without the knockout; bounded and explicit knockouts agree)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_generation_benchmark_quick():
    result = _import("generation").main(["--quick", "--no-write", "--report-reps", "0", "--batches", "2",
                                         "--new-tokens", "3"])
    assert result["cells"] and all(all(c["correct"].values()) for c in result["cells"])
    assert {"mech", "hf", "mech_ko", "hf_ko", "hf_aa"} <= set(result["cells"][0]["rows"])


@pytest.mark.slow
def test_post_softmax_benchmark_quick():
    result = _import("post_softmax_knockout").main(["--quick", "--no-write"])
    assert result["max_abs_logits_diff"] <= 1e-5
    assert set(result["memory"]) == {"plain", "pre_softmax_mask", "post_softmax_zero", "post_softmax_explicit"}
