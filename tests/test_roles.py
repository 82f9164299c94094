"""Token roles for both families, against masks written out by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm.synthetic import GEMMA3_IDS, QWEN_IDS


def _mask(n: int, rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), n, dtype=torch.bool)
    for r, pos in enumerate(rows):
        out[r, pos] = True
    return out


def test_qwen_roles_by_hand(qwen_model):
    # row 0: t t VS I I I I VE t t t ; row 1: 6 pads, then 5 text tokens (no image)
    batch = qwen_batch([[2, (1, 4, 4), 3], [5]], seed=0)
    ids = batch["input_ids"]
    assert ids[0, 2] == QWEN_IDS["vision_start"] and ids[0, 7] == QWEN_IDS["vision_end"]
    roles = qwen_model.roles(**batch)
    n = 11
    assert torch.equal(roles.image, _mask(n, [[3, 4, 5, 6], []]))
    assert torch.equal(roles.eoi, _mask(n, [[7], []]))
    assert torch.equal(roles.image_start, _mask(n, [[2], []]))
    assert torch.equal(roles.prefix, _mask(n, [[0, 1], [6, 7, 8, 9, 10]]))
    assert torch.equal(roles.text, _mask(n, [[8, 9, 10], []]))
    assert torch.equal(roles.pad, _mask(n, [[], [0, 1, 2, 3, 4, 5]]))
    assert torch.equal(roles.last, _mask(n, [[10], [10]]))
    assert not roles.bos.any()
    assert roles.grid_row[0, 3:7].tolist() == [0, 0, 1, 1] and roles.grid_col[0, 3:7].tolist() == [0, 1, 0, 1]
    assert roles.image_index[0, 3:7].tolist() == [0] * 4 and (roles.image_index[1] == -1).all()
    # a role spec may be a user mask or a union
    assert torch.equal(roles.mask(["image", "eoi"]), roles.image | roles.eoi)
    assert torch.equal(roles.mask(roles.text), roles.text)
    with pytest.raises(ValueError, match="unknown token role"):
        roles.mask("images")
    with pytest.raises(ValueError, match="shape"):
        roles.mask(torch.zeros(1, 3, dtype=torch.bool))


def test_qwen_two_images_grid_coordinates(qwen_model):
    batch = qwen_batch([[1, (1, 4, 6), 2, (1, 6, 4), 1]], seed=0)
    roles = qwen_model.roles(**batch)
    img = roles.image[0].nonzero().squeeze(1)
    assert roles.image_index[0, img].tolist() == [0] * 6 + [1] * 6
    assert roles.grid_row[0, img].tolist() == [0, 0, 0, 1, 1, 1] + [0, 0, 1, 1, 2, 2]
    assert roles.grid_col[0, img].tolist() == [0, 1, 2, 0, 1, 2] + [0, 1, 0, 1, 0, 1]
    assert roles.eoi.sum() == 2 and roles.image_start.sum() == 2
    # text lies after the first image, including the tokens between the two images
    ids = batch["input_ids"][0]
    between = (ids != QWEN_IDS["image"]) & (ids != QWEN_IDS["vision_start"]) & (ids != QWEN_IDS["vision_end"])
    assert torch.equal(roles.text[0], between & (torch.arange(len(ids)) > 1))


def test_missing_eoi_is_an_error(qwen_model):
    batch = qwen_batch([[2, (1, 4, 4), 3]], seed=0)
    ids = batch["input_ids"].clone()
    ids[0, 7] = 9  # the vision_end token replaced by a text token
    with pytest.raises(ValueError, match="EOI is missing"):
        qwen_model.roles(**{**batch, "input_ids": ids})


def test_gemma3_roles_by_hand():
    from test_gemma3 import batch_from, make_hf
    from mechvlm import HookedVLM

    model = HookedVLM.from_hf(make_hf(seed=0))
    # BOS t BOI I I I I EOI t t   (mm_tokens=4, a 2x2 grid)
    batch = batch_from([[1, "image", 2]], mm=4, seed=0)
    ids = batch["input_ids"][0]
    assert ids[0] == GEMMA3_IDS["bos"] and ids[2] == GEMMA3_IDS["boi"] and ids[7] == GEMMA3_IDS["eoi"]
    roles = model.roles(**batch)
    n = len(ids)
    assert torch.equal(roles.bos, _mask(n, [[0]]))
    assert torch.equal(roles.image_start, _mask(n, [[2]]))
    assert torch.equal(roles.image, _mask(n, [[3, 4, 5, 6]]))
    assert torch.equal(roles.eoi, _mask(n, [[7]]))
    assert torch.equal(roles.prefix, _mask(n, [[0, 1]]))
    assert torch.equal(roles.text, _mask(n, [[8, 9]]))
    assert roles.grid_row[0, 3:7].tolist() == [0, 0, 1, 1] and roles.grid_col[0, 3:7].tolist() == [0, 1, 0, 1]
