"""`mechvlm report --analyses kv_probes,key_artifacts,head_attribution,causal_tracing` on the
shipped toy: the sections land in results.json and report.html, and their numbers equal the
analyses called directly on the same inputs (independent of the report's plumbing)."""

from __future__ import annotations

import json

import pytest
import torch

from mechvlm.cli import main

SECTIONS = ("kv_probes", "key_artifacts", "head_attribution", "causal_tracing")


@pytest.mark.slow
def test_report_kv_sections_on_the_shipped_toy(tmp_path, monkeypatch):
    from mechvlm import HookedVLM
    from mechvlm.analyses.causal_tracing import causal_trace
    from mechvlm.analyses.head_attribution import head_attribution
    from mechvlm.mmbench import load_mmbench
    from mechvlm.processing import InputBuilder
    from mechvlm.report.run import metric_batches
    from mechvlm.toy.benchmark import SHIPPED_TSV
    from mechvlm.toy.checkpoint import SHIPPED

    from mechvlm.report.sections import head_attribution as ha_section
    from mechvlm.report.sections import kv_probes as probe_section

    monkeypatch.setattr(probe_section, "SIZES", (8, 4, 8))  # smaller than the report's defaults
    monkeypatch.setattr(ha_section, "N_MASKS", 32)
    out = tmp_path / "report"
    assert main(["report", "--model", str(SHIPPED["qwen2_5_vl"]), "--out", str(out), "--no-progress",
                 "--limit", "4", "--batch-size", "4",
                 "--conditions", "none", "--analyses", ",".join(SECTIONS)]) == 0
    res = json.loads((out / "results.json").read_text())["analyses"]
    assert set(res) == set(SECTIONS)
    html = (out / "report.html").read_text()
    for heading in ("Zero-shot probes", "Input-agnostic image keys", "Head attribution", "Causal tracing"):
        assert heading in html
    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    batches = list(metric_batches(builder, load_mmbench(SHIPPED_TSV)[:4], 4))
    direct = head_attribution(model, batches, n_masks=32, ablate_prob=0.25, masks_per_forward=16, progress=False)
    got = torch.tensor(res["head_attribution"]["attribution"]["weights"])
    torch.testing.assert_close(got, direct.weights, atol=1e-5, rtol=1e-4)
    trace = causal_trace(model, batches, heads=True, progress=False)
    torch.testing.assert_close(torch.tensor(res["causal_tracing"]["recovery"], dtype=torch.float32),
                               trace.recovery.float(), atol=1e-5, rtol=1e-4)
    probes = res["kv_probes"]["no_prefix"]["rows"]
    assert {r["task"] for r in probes} == {"segmentation", "correspondence", "referring"}
    assert res["key_artifacts"]["artifacts"]["n_images"] == 4
