"""`mechvlm report`: the main job, on the shipped toy model and on a local Gemma3 directory.

The knockout table's baseline predictions are checked against HF's own model loaded from
the same directory (greedy first token, read through VLMEvalKit's extraction)."""

from __future__ import annotations

import json

import pytest
import torch

from mechvlm.cli import main
from mechvlm.mmbench import can_infer, load_mmbench, mmbench_prompt
from mechvlm.processing import InputBuilder
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED, build_toy, save_toy


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--no-progress", *args]) == 0
    html = (out / "report.html").read_text()
    # Table 1, Fig. 1 and Fig. 2 per model, one example row (all its layers) per category
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") >= 3 + 1
    assert "Table 1" in html and "Fig. 1" in html and "Fig. 2" in html and "Examples" in html
    assert (out / "mmbench_items.csv").is_file() and (out / "mmbench_summary.csv").is_file()
    return json.loads((out / "results.json").read_text())


def _assert_first_tokens_match_hf(model_dir, items, records) -> None:
    """Independent reference: HF's model from the same directory gives the same greedy
    first token as the report's ``none`` condition."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    builder = InputBuilder.from_pretrained(model_dir)
    batch = builder([mmbench_prompt(it) for it in items], [[it.pil_image()] for it in items])
    kw = dict(batch)
    image = batch["input_ids"] == (hf.config.image_token_id if hf.config.model_type == "qwen2_5_vl"
                                   else hf.config.image_token_index)
    if hf.config.model_type == "qwen2_5_vl":
        kw["mm_token_type_ids"] = image.long()
    else:
        kw["token_type_ids"] = image.long()
        kw["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        first = hf(**kw).logits[:, -1].argmax(-1).tolist()
    for tok, rec in zip(first, records, strict=True):
        if rec["tokens"]:
            assert rec["tokens"][0] == tok
        else:  # stopped at once
            assert tok in builder.eos_token_ids


def test_report_on_the_shipped_toy_qwen(tmp_path):
    res = _run(tmp_path, "--model", str(SHIPPED["qwen2_5_vl"]), "--limit", "20")
    assert res["n_items"] == 20 and res["model_type"] == "qwen2_5_vl"
    ko = res["knockout"]
    assert set(ko) == {"none", "text→image:pre_softmax_mask", "text→image:post_softmax_zero",
                       "text→EOI:pre_softmax_mask", "text→EOI:post_softmax_zero"}
    assert all(c["n"] == 20 for c in ko.values())
    share = res["attention_share"]
    assert share["layers"] == [0, 1, 2, 3] and share["keys"] == ["image", "eoi"]
    for row in share["mean_head_share"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)
    items = load_mmbench(SHIPPED_TSV)[:20]
    _assert_first_tokens_match_hf(SHIPPED["qwen2_5_vl"], items, ko["none"]["items"])
    # the trained toy answers one option line: its letter is the first token's
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    for rec, it in zip(ko["none"]["items"], items):
        assert rec["prediction"] == can_infer(builder.decode(rec["tokens"][:1]), it.options)


def test_report_on_a_local_random_gemma3_directory(tmp_path):
    torch.manual_seed(0)
    model, tok, proc = build_toy("gemma3")
    save_toy(model, tok, proc, tmp_path / "gemma3-random")
    res = _run(tmp_path, "--model", str(tmp_path / "gemma3-random"), "--limit", "6", "--batch-size", "4")
    assert res["model_type"] == "gemma3" and res["n_items"] == 6
    assert res["received_attention"]["layers"] == [0, 1, 2, 3]
    items = load_mmbench(SHIPPED_TSV)[:6]
    _assert_first_tokens_match_hf(tmp_path / "gemma3-random", items, res["knockout"]["none"]["items"])


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["report", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--no-progress"])


def test_report_optional_sections_and_chosen_conditions(tmp_path):
    from mechvlm import HookedVLM, logit_lens
    from mechvlm.report.run import metric_batches

    res = _run(tmp_path, "--model", str(SHIPPED["qwen2_5_vl"]), "--limit", "4", "--batch-size", "2",
               "--analyses", "logit_lens",
               "--conditions", "none,text->image:pre_softmax_mask")
    assert set(res["knockout"]) == {"none", "text→image:pre_softmax_mask"}
    lens = res["analyses"]["logit_lens"]
    # independent of the report plumbing: the metric called directly on the same batches
    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    direct = logit_lens(model, list(metric_batches(builder, load_mmbench(SHIPPED_TSV)[:4], 2)),
                        positions="image", k=5, progress=False).to_dict()
    assert lens["top_ids"] == direct["top_ids"].tolist()
    assert "Logit lens on the image tokens" in (tmp_path / "report" / "report.html").read_text()


def test_report_unknown_section_or_condition_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown report analysis 'nope'.*logit_lens"):
        main(["report", "--model", str(tmp_path / "missing"), "--analyses", "nope", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="unknown condition 'text->nothing'"):
        main(["report", "--model", str(tmp_path / "missing"), "--conditions", "text->nothing", "--limit", "2",
              "--out", str(tmp_path / "r2"), "--no-progress"])
