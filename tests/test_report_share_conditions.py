"""`mechvlm report --analyses share_conditions` on the shipped toy: the section lands in
results.json and report.html, and its shares equal `attention_share` run condition by
condition on the same batches (independent of the report plumbing and of prefix sharing)."""

from __future__ import annotations

import json

import torch

from mechvlm.cli import main


def test_report_share_conditions_section(tmp_path):
    from mechvlm import HookedVLM
    from mechvlm.metrics import attention_share
    from mechvlm.mmbench import CONDITIONS, load_mmbench
    from mechvlm.processing import InputBuilder
    from mechvlm.report.run import metric_batches
    from mechvlm.toy.benchmark import SHIPPED_TSV
    from mechvlm.toy.checkpoint import SHIPPED

    out = tmp_path / "report"
    assert main(["report", "--model", str(SHIPPED["qwen2_5_vl"]), "--out", str(out), "--no-progress",
                 "--limit", "4", "--batch-size", "2", "--conditions", "none", "--analyses", "share_conditions"]) == 0
    res = json.loads((out / "results.json").read_text())["analyses"]["share_conditions"]
    assert set(res["results"]) == set(CONDITIONS) and res["n_batches"] == 2
    assert res["shared_batches"] == {k: 2 for k in CONDITIONS}
    assert "Attention share under each condition" in (out / "report.html").read_text()
    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    batches = list(metric_batches(InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"]), load_mmbench(SHIPPED_TSV)[:4], 2))
    for name, c in CONDITIONS.items():
        direct = attention_share(model, batches, fwd_hooks=c, progress=False)
        got = torch.tensor(res["results"][name]["share"], dtype=torch.float32)
        torch.testing.assert_close(got, direct.share, atol=1e-5, rtol=0, equal_nan=True, msg=name)
    # the check the section makes visible: each knockout removes its key role's share
    image, eoi = (res["results"]["none"]["keys"].index(k) for k in ("image", "eoi"))
    for name, key in (("text→image:pre_softmax_mask", image), ("text→EOI:post_softmax_zero", eoi)):
        assert torch.tensor(res["results"][name]["mean_head_share"])[:, key].abs().max() < 1e-6, name
    assert torch.tensor(res["results"]["none"]["mean_head_share"])[:, image].min() > 0
