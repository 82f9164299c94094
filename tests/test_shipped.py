"""The shipped artifacts: the synthetic MMBench TSV and the two trained toy checkpoints.

These are measured properties of the files in the package, not mocks: baseline accuracy
with the seed protocol >= 0.80, and a text->image knockout at least 0.30 lower."""

from __future__ import annotations

import json

import pytest

from mechvlm import HookedVLM
from mechvlm.mmbench import evaluate, load_mmbench
from mechvlm.processing import InputBuilder
from mechvlm.toy.benchmark import SHIPPED_TSV, write_benchmark
from mechvlm.toy.checkpoint import SHIPPED


def test_shipped_tsv_is_what_the_generator_writes(tmp_path):
    again = write_benchmark(tmp_path / "mmbench.tsv")  # the defaults made the shipped file
    assert again.read_bytes() == SHIPPED_TSV.read_bytes()
    items = load_mmbench(SHIPPED_TSV)
    assert len(items) == 400 and len({it.group for it in items}) == 100
    letters = [it.answer for it in items]
    assert all(letters.count(x) == 100 for x in "ABCD")
    assert {it.category for it in items} == {"color", "size", "position", "count"}
    bases = {it.index: it for it in items if it.circular_copy == 0}
    for it in items:  # each rotated copy has the same image and the answer moved with it
        base = bases[it.group]
        assert it.image == base.image
        assert it.options[it.answer] == base.options[base.answer]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_shipped_toy_model_reads_the_image(family):
    path = SHIPPED[family]
    record = json.loads((path / "training.json").read_text())
    assert {"seed", "steps", "wall_s", "held_out_mc"} <= set(record)
    model = HookedVLM.from_pretrained(str(path))
    builder = InputBuilder.from_pretrained(path)
    items = load_mmbench(SHIPPED_TSV)
    res = evaluate(model, builder, items, ["none", "text→image:pre_softmax_mask"], batch_size=32,
                   max_new_tokens=2, progress=False)
    base, knocked = res["none"]["accuracy"], res["text→image:pre_softmax_mask"]["accuracy"]
    assert base >= 0.80, res["none"]["per_category"]
    assert base - knocked >= 0.30, (base, knocked)
