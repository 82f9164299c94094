"""benchmarks/compare_peers.py --quick (tiny models): every section is written, and the tools
agree where they should (logits, patterns, knockouts, attention shares)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytest.importorskip("nnsight")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def restore_torch_state():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_compare_peers_quick(tmp_path, monkeypatch, restore_torch_state):
    monkeypatch.syspath_prepend(str(BENCH))
    import compare_peers

    compare_peers.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "compare_peers.json").read_text())

    assert set(data["families"]) == {"qwen", "gemma"}
    for fam, r in data["families"].items():
        for section in ("forward", "patterns", "knockout", "share"):
            assert r[section], f"{fam}: empty section {section}"
            for row in r[section].values():
                assert row["median_ms"] > 0 and row["samples_ms"]
        assert {"mech", "hf_sdpa", "bridge"} <= set(r["forward"])
        assert {"mech_ko_pre", "mech_ko_post", "nn_ko_pre", "nn_ko_post"} <= set(r["knockout"])
        assert r["forward"]["mech"]["vs"]["hf_sdpa"]["median_of_paired_ratios"] > 0
        assert set(r["memory"]) == {"patterns", "share"}
        assert {"mech", "mech_cache", "hf_eager_attn", "bridge_cache"} <= set(r["memory"]["patterns"])
        assert {"mech", "mech_share", "hf_eager_share", "bridge_share"} <= set(r["memory"]["share"])
        checks = {c["check"]: c for c in r["correctness"]}
        for name in ("mech logits vs HF sdpa", "mech_cache patterns vs HF eager attentions",
                     "mechvlm pre_softmax_mask vs nnsight mask edit (HF sdpa)",
                     "mechvlm post_softmax_zero vs nnsight softmax-output edit (HF eager)",
                     "mech_share vs HF eager attentions -> share", "bridge_share vs HF eager attentions -> share"):
            assert checks[name]["pass"] is True, (fam, name, checks[name])
    # where the bridge's pattern edit takes effect (Gemma3), its knockout agrees with nnsight's
    gemma = {c["check"]: c for c in data["families"]["gemma"]["correctness"]}
    assert gemma["bridge hook_pattern edit vs nn_ko_post"]["pass"] is True

    points = data["scaling"]["points"]
    assert [p["image_tokens"] for p in points] == [4, 16]
    for p in points:
        assert {"mech_share", "hf_eager_share", "bridge_share", "hf_eager"} <= set(p["time"])
        assert {"mech", "mech_share", "hf_eager_share", "bridge_share"} <= set(p["memory"])
    assert data["targets"]
    failed = [c for f in data["families"].values() for c in f["correctness"] if c["pass"] is False]
    assert not failed and data["correctness_pass"], failed

    md = (tmp_path / "RESULTS.md").read_text()
    for header in ("## Targets", "### 1. Forward pass", "### 2. Caching every attention pattern",
                   "### 3. Knockout", "### 4. attention_share", "## 5. Scaling", "## Correctness"):
        assert header in md
