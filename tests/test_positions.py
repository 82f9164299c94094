"""mRoPE positions built by mechvlm against HF's get_rope_index (given mm_token_type_ids)."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_kwargs, qwen_batch

LAYOUTS = {
    "image_first": [[(1, 4, 6), 5]],
    "tall_and_wide": [[2, (1, 8, 2), 3, (1, 2, 8), 1]],
    "three_images_padded": [[1, (1, 4, 4), 1, (1, 4, 6), 2], [6, (1, 6, 6), 1], [9]],
    "two_frames": [[3, (2, 4, 4), 4]],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_match_hf_get_rope_index(qwen_hf, qwen_model, layout):
    batch = qwen_batch(LAYOUTS[layout], seed=11)
    kw = hf_kwargs(batch)
    ref, _ = qwen_hf.model.get_rope_index(
        batch["input_ids"], kw["mm_token_type_ids"], batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])
    ours = qwen_model.prepare_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                     batch["attention_mask"]).position_ids
    assert ours.shape == ref.shape == (3, *batch["input_ids"].shape)
    assert torch.equal(ours, ref)


def test_image_spans_carry_grid_and_order(qwen_model):
    batch = qwen_batch(LAYOUTS["three_images_padded"], seed=11)
    spans = qwen_model.prepare_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                      batch["attention_mask"]).spans
    assert [(s.image, s.row, s.grid) for s in spans] == [(0, 0, (1, 2, 2)), (1, 0, (1, 2, 3)), (2, 1, (1, 3, 3))]
    ids = batch["input_ids"]
    for s in spans:
        assert bool((ids[s.row, s.start:s.stop] == qwen_model.cfg.image_token_id).all())
        assert int(ids[s.row, s.stop]) == qwen_model.cfg.image_end_token_id
        assert int(ids[s.row, s.start - 1]) == qwen_model.cfg.image_start_token_id
