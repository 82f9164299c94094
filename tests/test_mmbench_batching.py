"""`evaluate` batches items by prompt length (the builder's ``prompt_lengths`` when it has
one, else the prompt's characters) and keeps the records in item order; the generated
tokens do not depend on the batching (one item at a time is the reference). And
`InputBuilder.prompt_lengths` equals the length of the rows it builds."""

from __future__ import annotations

from _mmbench_ref import StubBuilder
from mechvlm.mmbench import evaluate, mmbench_prompt
from test_mmbench_evaluate import make_items


class LengthBuilder(StubBuilder):
    """The stub builder with the optional ``prompt_lengths``: one token per word + BOS + images."""

    def prompt_lengths(self, prompts, images):
        return [1 + 6 * len(ims) + len(p.split()) for p, ims in zip(prompts, images)]


def test_batches_sorted_by_prompt_length_records_in_item_order(qwen_model):
    items = make_items()
    alone = evaluate(qwen_model, StubBuilder(), items, conditions=["none"], batch_size=1, max_new_tokens=3,
                     progress=False)["none"]
    for builder in (LengthBuilder(), StubBuilder()):
        out = evaluate(qwen_model, builder, items, conditions=["none"], batch_size=2, max_new_tokens=3,
                       progress=False)["none"]
        assert [r["index"] for r in out["items"]] == [it.index for it in items]
        if isinstance(builder, LengthBuilder):
            key = [[1 + 6 + len(p.split()) for p in prompts] for prompts, _ in builder.calls]
        else:
            key = [[len(p) for p in prompts] for prompts, _ in builder.calls]
        assert sorted(sum(key, [])) == sum(key, [])  # batch after batch, shortest first
        seen = [p for prompts, _ in builder.calls for p in prompts]
        assert seen != [mmbench_prompt(it) for it in items]  # the items were reordered
        assert [r["tokens"] for r in out["items"]] == [r["tokens"] for r in alone["items"]]


def test_input_builder_prompt_lengths_equal_its_rows():
    from mechvlm.mmbench.tsv import load_mmbench
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.benchmark import SHIPPED_TSV
    from mechvlm.toy.checkpoint import SHIPPED
    from PIL import Image

    items = load_mmbench(SHIPPED_TSV)[:2]
    prompts = [mmbench_prompt(it) + " and some more words" * i for i, it in enumerate(items)]
    for family in ("qwen2_5_vl", "gemma3"):
        builder = InputBuilder.from_pretrained(SHIPPED[family])
        images = [[it.pil_image()] for it in items] + [[Image.new("RGB", (97, 41))]]
        prompts3 = prompts + ["a wide image"]
        lengths = builder.prompt_lengths(prompts3, images)
        rows = [int(builder([p], [ims])["attention_mask"].sum()) for p, ims in zip(prompts3, images)]
        assert lengths == rows and len(set(lengths)) > 1
