"""`evaluate` end to end on a tiny random Qwen2.5-VL with a stub input builder: the result
dict is consistent, its generated tokens are those of an independent HF greedy loop
(with hand-computed knockout masks), and the report tables / files read it."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
import torch

from _mmbench_ref import StubBuilder, hf_knockout_greedy
from mechvlm.mmbench import (CONDITIONS, MMBenchItem, can_infer, evaluate, load_results, mmbench_prompt,
                             outputs_table, print_report, save_results, table1)
from mechvlm.mmbench.report_tables import fmt_score

STEPS = 3


def png_b64(color) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_items() -> list[MMBenchItem]:
    red, blue, green = png_b64((220, 20, 20)), png_b64((20, 20, 220)), png_b64((20, 200, 20))
    opts = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    rot = {"A": "yellow", "B": "red", "C": "blue", "D": "green"}
    return [
        MMBenchItem(1, "What color is the square?", opts, hint="Look.", answer="A", category="color", image=red),
        MMBenchItem(1_000_001, "What color is the square?", rot, hint="Look.", answer="B", category="color",
                    image=red),
        MMBenchItem(2, "Which color?", opts, answer="B", category="color", image=blue),
        MMBenchItem(3, "Is it a circle?", {"A": "yes", "B": "no"}, answer="B", category="shape", image=green),
        MMBenchItem(4, "Pick one.", {"A": "x", "B": "y", "C": "z"}, answer=None, category="shape", image=blue),
        MMBenchItem(5, "What is shown in the picture, in a long question?", opts, hint="A hint.",
                    answer="C", category="shape", image=green),
    ]


@pytest.fixture(scope="module")
def results(qwen_model):
    return evaluate(qwen_model, StubBuilder(), make_items(), batch_size=4, max_new_tokens=STEPS, progress=False)


def test_result_is_consistent(results):
    items = make_items()
    assert list(results) == list(CONDITIONS)
    for name, s in results.items():
        assert s["condition"]["name"] == name
        recs = s["items"]
        assert [r["index"] for r in recs] == [it.index for it in items]
        scored = [r for r in recs if r["answer"] is not None]
        assert (s["n"], s["n_items"], s["n_unscored"]) == (5, 6, 1)
        acc = sum(r["correct"] for r in scored) / len(scored)
        assert s["accuracy"] == pytest.approx(acc) and s["std"] == pytest.approx((acc * (1 - acc)) ** 0.5)
        assert sum(s["outputs"].values()) == 6 and sum(s["output_fractions"].values()) == pytest.approx(1.0)
        assert {k: v["n"] for k, v in s["per_category"].items()} == {"color": 3, "shape": 2}
        assert s["circular"]["n"] == 4 and s["vanilla_0"]["n"] == 4
        for r, it in zip(recs, items):
            assert r["prediction"] == can_infer(r["raw"], it.options)
            assert r["correct"] == (r["answer"] is not None and r["prediction"] == r["answer"])
            assert len(r["tokens"]) <= STEPS and r["group"] == it.group
        assert s["settings"]["max_new_tokens"] == STEPS
        json.dumps(s)


@pytest.mark.parametrize("name", ["none", "text→image:pre_softmax_mask", "text→EOI:post_softmax_zero"])
def test_tokens_match_independent_hf_loop(qwen_hf, results, name):
    cond, items, builder = CONDITIONS[name], make_items(), StubBuilder()
    expected = []
    for start in range(0, len(items), 4):
        chunk = items[start:start + 4]
        batch = builder([mmbench_prompt(it) for it in chunk], [[it.pil_image()] for it in chunk])
        ids, _ = hf_knockout_greedy(qwen_hf, batch, STEPS, cond.key, cond.mode)
        for row in ids[:, batch["input_ids"].shape[1]:].tolist():
            cut = [t in builder.eos_token_ids for t in row]
            expected.append(row[: cut.index(True)] if any(cut) else row)
    recs = results[name]["items"]
    assert [r["tokens"] for r in recs] == expected
    assert [r["raw"] for r in recs] == [builder.decode(t) for t in expected]


def test_knockout_changes_outputs(results):
    none = [r["tokens"] for r in results["none"]["items"]]
    for name in ("text→image:pre_softmax_mask", "text→image:post_softmax_zero"):
        assert [r["tokens"] for r in results[name]["items"]] != none


def test_eos_only_counted(qwen_model, results):
    """Make the first token generated for item 1 an EOS: it then generates nothing."""
    first = results["none"]["items"][0]["tokens"][0]
    builder = StubBuilder(eos_token_ids=[2, first])
    out = evaluate(qwen_model, builder, make_items()[:2], conditions=["none"], batch_size=2, max_new_tokens=2,
                   progress=False)["none"]
    r = out["items"][0]
    assert (r["tokens"], r["raw"], r["prediction"], r["kind"], r["stopped"]) == ([], "", None, "eos_only", True)
    assert out["outputs"]["eos_only"] >= 1
    assert builder.calls[0][1] == [1, 1]  # one image per item


def test_condition_arguments(qwen_model):
    items = make_items()[:2]
    calls = []

    def custom(batch, roles):
        calls.append(batch["input_ids"].shape)
        return []

    out = evaluate(qwen_model, StubBuilder(), items, conditions={"mine": custom}, batch_size=2,
                   max_new_tokens=2, progress=False)
    assert list(out) == ["mine"] and out["mine"]["condition"]["custom_hooks"] and len(calls) >= 1
    out = evaluate(qwen_model, StubBuilder(), items, conditions=["none", "text->EOI:pre_softmax_mask"],
                   batch_size=2, max_new_tokens=1, progress=False)
    assert list(out) == ["none", "text→EOI:pre_softmax_mask"]
    with pytest.raises(ValueError, match="unknown condition"):
        evaluate(qwen_model, StubBuilder(), items, conditions=["text→img"], progress=False)
    with pytest.raises(ValueError, match="no MMBench items"):
        evaluate(qwen_model, StubBuilder(), [], progress=False)


def test_report_tables_and_files(results, tmp_path, capsys):
    t = table1({"tiny": results})
    lines = t.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["model", "mode", "none", "text→img", "text→EOI"]
    assert len(lines) == 4  # header, rule, one row per mode
    none = results["none"]
    cell = fmt_score(none["accuracy"], none["std"])
    assert lines[2].count(cell) >= 1 and "pre_softmax_mask" in lines[2] and "post_softmax_zero" in lines[3]
    assert fmt_score(0.392, 0.48822) == ".392 (.488)" and fmt_score(1.0, 0.0) == "1.000 (.000)"
    assert table1(results).splitlines()[2].startswith("| model ")  # one model: no name given
    assert "eos_only" in outputs_table(results)
    print_report({"tiny": results})
    assert "text→EOI" in capsys.readouterr().out

    paths = save_results({"tiny": results}, tmp_path / "out")
    assert load_results(paths["json"]) == json.loads(json.dumps({"tiny": results}))
    with open(paths["items"], newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f))
    assert len(items) == 6 * len(CONDITIONS) and items[0]["model"] == "tiny" and items[0]["condition"] == "none"
    with open(paths["summary"], newline="", encoding="utf-8") as f:
        summary = list(csv.DictReader(f))
    assert [r["condition"] for r in summary] == list(CONDITIONS)
    assert float(summary[0]["accuracy"]) == pytest.approx(none["accuracy"])


def test_viz_accepts_results(results):
    pytest.importorskip("matplotlib")
    from mechvlm.viz import normalize_knockout

    one = normalize_knockout(results)
    assert list(one[""]) == list(CONDITIONS) and one[""]["none"]["n"] == 5
    assert one[""]["none"]["outputs"] == results["none"]["outputs"]
    two = normalize_knockout({"a": results, "b": results})
    assert list(two) == ["a", "b"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mechvlm.viz import fig_knockout

    fig = fig_knockout({"a": results})
    assert len(fig.axes) == 2  # accuracy bars and the output-kind panel
    plt.close(fig)


def test_prompt_reaches_builder(qwen_model):
    builder = StubBuilder()
    items = make_items()[:1]
    evaluate(qwen_model, builder, items, conditions=["none"], max_new_tokens=1, progress=False)
    assert builder.calls[0][0] == [mmbench_prompt(items[0])]
    assert torch.is_tensor(builder(["x"], [[items[0].pil_image()]])["pixel_values"])
