"""Sink / dead / alive on hand-planted tokens, against a hand computation from HF's own
hidden states, embedding matrix and image features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_kwargs, qwen_batch, real_tokens
from mechvlm.analyses.token_categories import (DEAD, SINK, embedlens_categories, find_sink_dims,
                                               massive_activation_categories)
from mechvlm.synthetic import QWEN_IDS

DIM, BIG, TAU = 7, 400.0, 5.0  # r <= sqrt(d_model) = 8 here, so a threshold below 8


@pytest.fixture(scope="module")
def setup(qwen_hf, qwen_model):
    batch = qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 4]], seed=51)
    with torch.no_grad():
        feats = torch.cat(qwen_hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                          .pooler_output)
    return batch, feats


def _hf_hidden(hf, batch, feats, plant):
    """HF hidden states with the image features ``feats`` and ``plant`` added to layer 0's
    output (a forward hook on HF's decoder layer)."""
    ids = batch["input_ids"]
    kw = hf_kwargs(batch)
    pos, _ = hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                    attention_mask=batch["attention_mask"])
    emb = hf.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IDS["image"])[..., None], feats)
    layers = hf.model.language_model.layers
    outs = [emb]  # recorded by our own hooks (HF's output_hidden_states capture may run before ours)

    def planted(m, i, o):
        outs.append(o + plant)
        return outs[-1]

    handles = [layers[0].register_forward_hook(planted)]
    handles += [layers[l].register_forward_hook(lambda m, i, o: outs.append(o)) for l in range(1, len(layers))]
    try:
        with torch.no_grad():
            hf(inputs_embeds=emb, attention_mask=batch["attention_mask"], position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    return outs  # [embeddings, output of layer 0 (planted), of layer 1, ...] = HF's hidden_states[0..]


def test_planted_massive_activation_and_zero_token(qwen_hf, qwen_model, setup):
    batch, feats = setup
    ids, real = batch["input_ids"], real_tokens(batch)
    image = ids == QWEN_IDS["image"]
    img_pos = image.nonzero().tolist()
    sink_tok, zero_tok, pad_tok = img_pos[3], img_pos[7], img_pos[9]  # (row, pos): image 0, image 1, image 1
    first = [(r, int(real[r].nonzero()[0])) for r in range(ids.shape[0])]  # BOS-like tokens
    plant = torch.zeros(*ids.shape, qwen_hf.config.text_config.hidden_size)
    for r, p in first + [tuple(sink_tok)]:
        plant[r, p, DIM] = BIG
    plant[img_pos[1][0], img_pos[1][1], DIM + 13] = BIG  # massive, but not on a sink dimension: alive
    feats = feats.clone()
    order = {tuple(p): i for i, p in enumerate(img_pos)}  # image token -> feature row
    feats[order[tuple(zero_tok)]] = 0.0
    W_E = qwen_hf.get_input_embeddings().weight.detach()
    feats[order[tuple(pad_tok)]] = 3.0 * W_E[QWEN_IDS["pad"]]
    # the reference, by hand from HF's hidden states (layers >= 1 here: the model has 3)
    hs = _hf_hidden(qwen_hf, batch, feats, plant)
    r = [(h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs() for h in hs[1:3]]
    ref_dims = sorted({d for rr in r for (row, p) in first for d in (rr[row, p] > TAU).nonzero().squeeze(-1).tolist()})
    assert ref_dims == [DIM]
    norm_cut = 0.05 * float(W_E.norm(dim=-1).median())
    expected = []
    for (row, p) in img_pos:
        massive = any(float(rr[row, p, ref_dims].max()) > TAU for rr in r)
        f = feats[order[(row, p)]]
        nearest = int((F.normalize(f, dim=0) @ F.normalize(W_E, dim=-1).T).argmax())
        dead = float(f.norm()) <= norm_cut or nearest == QWEN_IDS["pad"]
        expected.append(SINK if massive else DEAD if dead else 0)
    assert expected.count(SINK) == 1 and expected.count(DEAD) == 2 and expected[1] == 0
    assert float(r[0][tuple(img_pos[1])].max()) > TAU  # a massive activation the criterion must ignore
    # ours: the same plant through hooks, the same features through image_embeds
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x + plant)]
    b = dict(batch, image_embeds=feats)
    assert find_sink_dims(qwen_model, b, threshold=TAU, first_layer=1, fwd_hooks=hooks) == [DIM]
    res = massive_activation_categories(qwen_model, b, threshold=TAU, first_layer=1, fwd_hooks=hooks,
                                        progress=False)
    assert torch.cat(res.category).tolist() == expected
    assert res.layers == [1, 2] and res.settings["sink_dims"] == [DIM]
    assert abs(res.settings["dead_norm_cut"] - norm_cut) < 1e-5
    # fractions per image, and the category masks in the batch layout
    assert [s.n_tokens for s in res.spans] == [6, 4]
    assert torch.allclose(res.fractions, torch.tensor([[5 / 6, 1 / 6, 0.0], [0.5, 0.0, 0.5]]))
    sink_mask = res.masks(tuple(ids.shape), "sink")
    assert sink_mask.nonzero().tolist() == [sink_tok]
    # without the plant nothing is massive: no sink dims, a warning, no sink
    with pytest.warns(UserWarning, match="D_sink is empty"):
        clean = massive_activation_categories(qwen_model, b, threshold=TAU, first_layer=1, progress=False)
    assert SINK not in torch.cat(clean.category).tolist()
    with pytest.raises(ValueError, match="cannot exceed sqrt"):  # the default 20 > sqrt(64)
        massive_activation_categories(qwen_model, b, progress=False)


def test_embedlens_top3_against_hand_cosine(qwen_hf, qwen_model, setup):
    batch, feats = setup
    W_E = qwen_hf.get_input_embeddings().weight.detach()
    sink_id, dead_id = 17, 42
    feats = feats.clone()
    g = torch.Generator().manual_seed(0)
    feats[2] = W_E[sink_id] + 0.01 * torch.randn(W_E.shape[1], generator=g)
    feats[5] = 2.0 * W_E[dead_id]
    top = (F.normalize(feats, dim=-1) @ F.normalize(W_E, dim=-1).T).topk(3, dim=-1).indices
    expected = [SINK if sink_id in t else DEAD if dead_id in t else 0 for t in top.tolist()]
    assert expected[2] == SINK and expected[5] == DEAD
    res = embedlens_categories(qwen_model, dict(batch, image_embeds=feats), [sink_id], [dead_id], progress=False)
    assert torch.cat(res.category).tolist() == expected
    assert torch.equal(torch.cat(res.top_ids).sort(-1).values, top.sort(-1).values)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        embedlens_categories(qwen_model, batch, [10**6], [], progress=False)
