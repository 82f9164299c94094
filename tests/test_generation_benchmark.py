"""The generation and post-softmax-knockout benchmarks run end to end in ``--quick`` mode (tiny
models, nothing written): their correctness rows hold (mechvlm's tokens equal HF
``generate``'s, with and without the knockout; bounded and explicit knockouts agree)."""

from __future__ import annotations

import json
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
def test_report_before_issue_14_runs_without_the_cache_and_gives_the_same_table(monkeypatch):
    """The report's "before" contender really takes the old paths (no KV cache, no shared
    prefix: every generation step gets no ``past_kv_cache``) and its Table 1 equals today's."""
    import tempfile

    import mechvlm.generation as generation

    bench = _import("generation")
    seen = []
    real = generation.generate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("use_past_kv_cache", True), kwargs.get("past_kv_cache") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    args = bench.argparse.Namespace(report_limit=2)
    with tempfile.TemporaryDirectory() as tmp:
        fns = bench.report_contenders(args, tmp)
        before = fns["report_before"]()
        assert seen and all(not cached and not prefilled for cached, prefilled in seen)
        seen.clear()
        after = fns["report_after"]()
    assert any(prefilled for _, prefilled in seen)  # today's path shares the prefill
    assert {c: before[c]["accuracy"] for c in before} == {c: after[c]["accuracy"] for c in after}


@pytest.mark.slow
def test_post_softmax_benchmark_quick(capsys):
    bench = _import("post_softmax_knockout")
    result = bench.main(["--quick", "--no-write", "--only", "time"])
    assert result["max_abs_logits_diff"] <= 1e-5
    assert set(result["time"]["wall_ms"]) == {"plain", "plain_aa", "pre_softmax_mask", "post_softmax_zero",
                                               "post_softmax_explicit"}
    # the memory worker (a subprocess in a real run), in this process
    bench.memory_worker(json.dumps({"quick": True, "image_tokens": 16, "layers": 2, "dtype": "float32",
                                    "device": "cpu", "threads": 1, "tools": ["post_softmax_zero"]}))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MEMORY ")]
    assert len(line) == 1 and json.loads(line[0][7:])["tool"] == "post_softmax_zero"


def test_conditions_report_before_issue_21_runs_every_condition_on_its_own(monkeypatch):
    """The conditions benchmark's report "before" contender really shares no prefix (evaluate
    passes ``share_prefix`` itself), "after" does, and their Table 1 is the same."""
    import tempfile

    import mechvlm.prefix_sharing as prefix_sharing

    bench = _import("conditions")
    seen = []
    real = prefix_sharing.plan_conditions

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        seen.append(bool(plan.shared))
        return plan

    monkeypatch.setattr(prefix_sharing, "plan_conditions", spy)
    with tempfile.TemporaryDirectory() as tmp:
        fns = bench.report_contenders(2, tmp)
        before = fns["report_before"]()
        assert seen and not any(seen)
        seen.clear()
        after = fns["report_after"]()
    assert seen and all(seen)
    assert bench._tables(before) == bench._tables(after)
