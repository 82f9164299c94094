"""`mechvlm report` with the visual-token sections and conditions, on the shipped toy."""

from __future__ import annotations

import json

import torch

from mechvlm.cli import main
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED


def test_report_visual_token_sections_and_conditions(tmp_path):
    from mechvlm import HookedVLM
    from mechvlm.analyses import token_budget
    from mechvlm.mmbench import load_mmbench
    from mechvlm.mmbench.loss_batches import answer_loss_batches
    from mechvlm.processing import InputBuilder

    out = tmp_path / "report"
    conditions = ["none", "prune:dead:keys:threshold=8", "skip:mlp:0-1", "inject:2"]
    assert main(["report", "--out", str(out), "--no-progress", "--limit", "4", "--batch-size", "4",
                 "--analyses", "token_budget,token_contribution,token_categories",
                 "--conditions", ",".join(conditions)]) == 0
    res = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    for heading in ("Visual-token budget vs loss", "Per-token contribution", "Sink / dead / alive visual tokens"):
        assert heading in html
    assert list(res["knockout"]) == conditions and all(c["n"] == 4 for c in res["knockout"].values())
    # inject:2 hides the image from layers 0-1 of the text: the toy loses most of its accuracy
    assert res["knockout"]["inject:2"]["accuracy"] < res["knockout"]["none"]["accuracy"]
    a = res["analyses"]
    assert a["token_contribution"]["n_variants"] == 4 * (16 + 1)
    cats = a["token_categories"]
    assert "sinks_not_evaluated" in cats["settings"] and "sqrt(d_model)" in cats["settings"]["sinks_not_evaluated"]
    # independent of the report plumbing: the analysis called directly on the same items
    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    direct = token_budget(model, answer_loss_batches(builder, load_mmbench(SHIPPED_TSV)[:4], 4),
                          fractions=(0.125, 0.25, 0.5, 0.75, 1.0), draws=3, progress=False)
    assert torch.allclose(torch.tensor(a["token_budget"]["mean_loss"]), direct.mean_loss, atol=1e-5)
