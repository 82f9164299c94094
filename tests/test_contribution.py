"""The batched contribution map against a loop of single removals (one forward each, the
full logits scored by hand), its forward count, and the toy's ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import qwen_batch
from mechvlm.analyses.contribution import image_units, token_contribution
from mechvlm.interventions import mask_image_keys, remove_image_tokens
from mechvlm.synthetic import QWEN_IDS
from test_token_budget import _hand_loss

TOL = 1e-4


@pytest.fixture(scope="module")
def loss_batch():
    batch = qwen_batch([[3, (1, 4, 6), 2, (1, 4, 4), 4], [2, (1, 4, 4), 6]], seed=71)
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[:, -2:] = True
    return batch, target


def _one_row(batch, target, row):
    """Row ``row`` alone (its padding dropped), its images, and its target mask."""
    real = batch["attention_mask"][row].bool()
    ids = batch["input_ids"][row][real][None]
    grids = batch["image_grid_thw"]
    n_img_before = int((batch["input_ids"][:row] == QWEN_IDS["vision_start"]).sum())
    n_img = int((ids == QWEN_IDS["vision_start"]).sum())
    patches = grids.prod(-1).tolist()
    start = sum(patches[:n_img_before])
    stop = start + sum(patches[n_img_before:n_img_before + n_img])
    return ({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": batch["pixel_values"][start:stop],
             "image_grid_thw": grids[n_img_before:n_img_before + n_img]}, target[row][real][None])


@pytest.mark.parametrize("mode", ["removed", "masked"])
def test_contribution_equals_loop_of_single_removals(qwen_model, loss_batch, mode):
    batch, target = loss_batch
    res = token_contribution(qwen_model, loss_batch, mode=mode, batch_size=7, progress=False)
    n_image = int((batch["input_ids"] == QWEN_IDS["image"]).sum())
    assert res.n_variants == 2 + n_image and res.n_forwards == math.ceil((2 + n_image) / 7)
    i = 0
    for row in range(2):
        one, t = _one_row(batch, target, row)
        with torch.no_grad():
            base = _hand_loss(qwen_model(**one), one["input_ids"], t)[0]
        assert abs(float(res.base_loss[row]) - float(base)) <= TOL
        roles = qwen_model.roles(**one)
        for s in sorted(roles.spans, key=lambda s: s.start):
            assert res.spans[i].grid == s.grid and int(res.example[i]) == row
            for cell in range(s.n_tokens):  # drop this one token, one forward
                drop = torch.zeros_like(roles.image)
                drop[0, s.start + cell] = True
                with torch.no_grad():
                    if mode == "removed":
                        pb = remove_image_tokens(one, roles, drop)
                        loss = _hand_loss(qwen_model(**pb.batch), pb.batch["input_ids"], pb.take(t, fill=False))[0]
                    else:
                        loss = _hand_loss(qwen_model.run_with_hooks(**one, fwd_hooks=mask_image_keys(roles, drop)),
                                     one["input_ids"], t)[0]
                _, h, w = s.grid
                got = float(res.maps[i][0, cell // w, cell % w])
                assert abs(got - (float(loss) - float(base))) <= TOL, (row, s.image, cell)
            i += 1
    assert i == len(res.maps) == 3
    assert max(float(m.abs().max()) for m in res.maps) > 1e-3


def test_row_and_block_units(qwen_model, loss_batch):
    batch, target = loss_batch
    res = token_contribution(qwen_model, loss_batch, unit="row", batch_size=16, progress=False)
    one, t = _one_row(batch, target, 0)
    roles = qwen_model.roles(**one)
    s = sorted(roles.spans, key=lambda s: s.start)[0]  # 2x3 merged grid
    assert res.units[0] == [[0, 1, 2], [3, 4, 5]]
    with torch.no_grad():
        base = _hand_loss(qwen_model(**one), one["input_ids"], t)[0]
        drop = torch.zeros_like(roles.image)
        drop[0, s.start + 3:s.start + 6] = True  # grid row 1
        pb = remove_image_tokens(one, roles, drop)
        loss = _hand_loss(qwen_model(**pb.batch), pb.batch["input_ids"], pb.take(t, fill=False))[0]
    assert torch.allclose(res.maps[0][0, 1], torch.full((3,), float(loss - base)), atol=TOL)
    assert image_units(s, "block", 2) == [[0, 1, 3, 4], [2, 5]]
    # a 2x2 block covers the whole 2x2 images: removing it from the sequence is refused ...
    with pytest.raises(ValueError, match="every token of image"):
        token_contribution(qwen_model, loss_batch, unit="block", block=2, progress=False)
    # ... masking it as keys is not
    blocks = token_contribution(qwen_model, loss_batch, unit="block", block=2, mode="masked", progress=False)
    assert blocks.units[0] == [[0, 1, 3, 4], [2, 5]] and blocks.n_variants == 2 + 2 + 1 + 1


def test_toy_contribution_larger_on_object_tokens():
    """Ground truth of the shipped toy Qwen2.5-VL: the object cells of each scene
    (`Scene.token_mask(threshold=0)`) against the background cells. Seed fixed once, not tuned."""
    import random

    import numpy as np

    from mechvlm import HookedVLM
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.checkpoint import SHIPPED
    from mechvlm.toy.scenes import make_scenes
    from mechvlm.toy.train import mc_item

    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    scenes = make_scenes(16, seed=0)
    py = random.Random(0)
    items = [mc_item(s, py) for s in scenes]
    lb = builder.with_targets([p for p, _ in items], [[s.pil_image()] for s in scenes], [a for _, a in items])
    res = token_contribution(model, lb, batch_size=64, progress=False)
    gaps = [float(m[0].numpy()[s.token_mask(threshold=0)].mean() - m[0].numpy()[~s.token_mask(threshold=0)].mean())
            for m, s in zip(res.maps, scenes)]
    assert np.mean(gaps) > 0 and sum(g > 0 for g in gaps) > len(gaps) / 2
