"""Dropping image tokens, both readings, against Hugging Face's own models.

"Removed from the sequence" is compared with HF run on a shorter input built here by hand:
the kept tokens' ids, HF's own image features of the kept cells scattered in, and (Qwen)
the positions HF's ``get_rope_index`` gives the *full* input, at the kept columns; (Gemma3)
the 1-D positions of the shorter sequence and ``token_type_ids`` over the kept tokens.
"Masked as keys" is compared with HF eager given a 4-D mask.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_kwargs, qwen_batch, real_tokens
from mechvlm import HookedVLM
from mechvlm.interventions import mask_image_keys, remove_image_tokens
from mechvlm.synthetic import GEMMA3_IDS, QWEN_IDS

TOL = 1e-4


@pytest.fixture(scope="module")
def batch():  # two left-padded rows, three images (2x3, 2x2, 2x2 merged grids)
    return qwen_batch([[3, (1, 4, 6), 5, (1, 4, 4), 6], [2, (1, 4, 4), 7]], seed=31)


def _random_drop(ids: torch.Tensor, image_id: int, seed: int, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (ids == image_id) & (torch.rand(ids.shape, generator=g) < p)


def _shorter_rows(ids, real, drop, pad_id):
    """By hand: the kept columns of each row, left-padded again."""
    keep = real & ~drop
    width = int(keep.sum(-1).max())
    cols = []
    new_ids = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype)
    new_mask = torch.zeros(ids.shape[0], width, dtype=torch.long)
    for r in range(ids.shape[0]):
        c = keep[r].nonzero().squeeze(-1)
        cols.append(c)
        new_ids[r, width - len(c):] = ids[r, c]
        new_mask[r, width - len(c):] = 1
    return new_ids, new_mask, cols


def _shorter_positions(full_pos, new_ids, cols):
    """By hand: HF's mRoPE positions ``[3, batch, pos]`` of the kept columns, left-padded again."""
    pos = torch.zeros(3, *new_ids.shape, dtype=torch.long)
    for r, c in enumerate(cols):
        pos[:, r, new_ids.shape[1] - len(c):] = full_pos[:, r, c]
    return pos


def test_removed_qwen_equals_hf_on_shorter_input(qwen_hf, qwen_model, batch):
    ids, real = batch["input_ids"], real_tokens(batch)
    drop = _random_drop(ids, QWEN_IDS["image"], seed=3)
    assert int(drop.sum()) >= 4
    pb = remove_image_tokens(batch, qwen_model.roles(**batch), drop)
    with torch.no_grad():
        ours = qwen_model(**pb.batch)
    # the reference, by hand on HF
    kw = hf_kwargs(batch)
    full_pos, _ = qwen_hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    new_ids, new_mask, cols = _shorter_rows(ids, real, drop, QWEN_IDS["pad"])
    pos = _shorter_positions(full_pos, new_ids, cols)
    with torch.no_grad():
        feats = torch.cat(qwen_hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                          .pooler_output)
        # features are in image-token order over the full batch: keep those not dropped
        kept_feats = feats[~drop[ids == QWEN_IDS["image"]]]
        emb = qwen_hf.get_input_embeddings()(new_ids)
        emb = emb.masked_scatter((new_ids == QWEN_IDS["image"])[..., None], kept_feats)
        ref = qwen_hf(inputs_embeds=emb, attention_mask=new_mask, position_ids=pos).logits
    assert torch.equal(pb.batch["input_ids"], new_ids)
    new_real = new_mask.bool()
    assert (ours - ref)[new_real].abs().max() <= TOL
    # a real change: the full input gives other logits at the last token
    with torch.no_grad():
        full = qwen_model(**batch)
    assert (full[:, -1] - ours[:, -1]).abs().max() > 1e-3


def test_removed_qwen_roles_keep_grid_cells(qwen_model, batch):
    ids = batch["input_ids"]
    roles = qwen_model.roles(**batch)
    drop = _random_drop(ids, QWEN_IDS["image"], seed=4)
    pb = remove_image_tokens(batch, roles, drop)
    new_roles = qwen_model.roles(**pb.batch)
    for key in ("grid_row", "grid_col", "image_index"):
        before = getattr(roles, key)[roles.image & ~drop]
        after = getattr(new_roles, key)[new_roles.image]
        assert torch.equal(before, after), key
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, -3:] = True
    assert torch.equal(pb.take(target)[:, -3:], target[:, -3:]) and int(pb.take(target).sum()) == 6


def test_masked_as_keys_equals_hf_eager_4d_mask(qwen_hf, qwen_model, batch):
    ids, real = batch["input_ids"], real_tokens(batch)
    drop = _random_drop(ids, QWEN_IDS["image"], seed=5)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    allowed &= ~drop[:, None, None, :]
    kw = hf_kwargs(batch)
    pos, _ = qwen_hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    kw.update(attention_mask=torch.where(allowed, 0.0, torch.finfo(torch.float32).min), position_ids=pos)
    with torch.no_grad():
        ref = qwen_hf(**kw).logits
        ours = qwen_model.run_with_hooks(**batch, fwd_hooks=mask_image_keys(qwen_model.roles(**batch), drop))
        removed = qwen_model(**remove_image_tokens(batch, qwen_model.roles(**batch), drop).batch)
    assert (ours - ref)[real].abs().max() <= TOL
    assert not any(b.attn.needs_pattern() for b in qwen_model.blocks)
    # for Qwen (grid positions kept) removing and masking are the same computation
    assert (ours[:, -1] - removed[:, -1]).abs().max() <= TOL


def test_removal_errors_name_the_problem(qwen_model, batch):
    roles = qwen_model.roles(**batch)
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="not an image token"):
        remove_image_tokens(batch, roles, ids == QWEN_IDS["vision_end"])
    with pytest.raises(ValueError, match="every token of image 1"):
        drop = torch.zeros_like(roles.image)
        s = roles.spans[1]
        drop[s.row, s.start:s.stop] = True
        remove_image_tokens(batch, roles, drop)
    pb = remove_image_tokens(batch, roles, _random_drop(ids, QWEN_IDS["image"], seed=6))
    bad = dict(pb.batch, image_cells=[c.flip(0) for c in pb.batch["image_cells"]])
    with pytest.raises(ValueError, match="strictly increasing"):
        qwen_model(**bad)
    with pytest.raises(ValueError, match="image_cells keep"):
        qwen_model(**dict(pb.batch, image_cells=[torch.arange(s.n_cells) for s in roles.spans]))


# ----------------------------------------------------------------------------- Gemma3 --
@pytest.fixture(scope="module")
def gemma():
    from test_gemma3 import make_hf

    hf = make_hf(seed=3, mm_tokens=16, n_layers=4, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"] * 2)
    return hf, HookedVLM.from_hf(hf)


def test_removed_gemma3_equals_hf_on_shorter_input(gemma):
    from test_gemma3 import batch_from

    hf, model = gemma
    IMG = GEMMA3_IDS["image"]
    batch = batch_from([[3, "image", 5], [2, "image", 1, "image", 3]], mm=16, seed=7)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    drop = _random_drop(ids, IMG, seed=8)
    pb = remove_image_tokens(batch, model.roles(**batch), drop, pad_id=GEMMA3_IDS["pad"])
    with torch.no_grad():
        ours = model(**pb.batch)
        new_ids, new_mask, _ = _shorter_rows(ids, real, drop, GEMMA3_IDS["pad"])
        feats = hf.model.get_image_features(batch["pixel_values"]).pooler_output.reshape(-1, hf.config.text_config.hidden_size)
        kept = feats[~drop[ids == IMG]]
        emb = hf.get_input_embeddings()(new_ids).masked_scatter((new_ids == IMG)[..., None], kept)
        ref = hf(inputs_embeds=emb, attention_mask=new_mask, token_type_ids=(new_ids == IMG).long(),
                 position_ids=(new_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
        masked = model.run_with_hooks(**batch, fwd_hooks=mask_image_keys(model.roles(**batch), drop))
    assert (ours - ref)[new_mask.bool()].abs().max() <= TOL
    # Gemma3: the shorter sequence renumbers the text after the image, unlike the key mask
    assert (masked[:, -1] - ours[:, -1]).abs().max() > 1e-4
