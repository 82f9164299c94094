"""Token budget vs loss against HF's own model on hand-built inputs, the keep orders against
hand / brute-force rankings, and the forward count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_kwargs, qwen_batch, real_tokens
from mechvlm.analyses.token_budget import token_budget
from mechvlm.analyses.token_selection import token_order
from mechvlm.image_layout import ImageSpan
from mechvlm.synthetic import QWEN_IDS
from test_token_pruning import _shorter_rows

TOL = 1e-4


@pytest.fixture(scope="module")
def loss_batch():
    batch = qwen_batch([[3, (1, 4, 6), 7], [2, (1, 4, 4), 8]], seed=61)
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[:, -3:] = True  # the last three text tokens of each row are "the answer"
    return batch, target


def _hand_loss(logits, ids, target):
    """Mean cross-entropy of each row's target tokens, by a loop."""
    out = []
    for r in range(ids.shape[0]):
        cols = target[r].nonzero().squeeze(-1).tolist()
        out.append(sum(float(F.cross_entropy(logits[r, c - 1][None].float(), ids[r, c][None])) for c in cols) / len(cols))
    return torch.tensor(out)


def _first_k_drop(batch, k):
    """Drop all but the first k image tokens of every image, by hand from the token ids."""
    ids = batch["input_ids"]
    drop = torch.zeros_like(ids, dtype=torch.bool)
    for r in range(ids.shape[0]):
        pos = (ids[r] == QWEN_IDS["image"]).nonzero().squeeze(-1)
        # one image per row here
        drop[r, pos[k:]] = True
    return drop


def _hf_inputs(hf, batch):
    """ids, real-token mask, HF kwargs and HF's own 3-D positions (``get_rope_index``)."""
    kw = hf_kwargs(batch)
    pos, _ = hf.model.get_rope_index(batch["input_ids"], kw["mm_token_type_ids"], batch["image_grid_thw"],
                                    attention_mask=batch["attention_mask"])
    return batch["input_ids"], real_tokens(batch), kw, pos


def test_removed_budget_equals_hf_on_shorter_input(qwen_hf, qwen_model, loss_batch):
    batch, target = loss_batch
    res = token_budget(qwen_model, loss_batch, ks=[1, 3], strategies="first", mode="removed", progress=False)
    ids, real, kw, full_pos = _hf_inputs(qwen_hf, batch)
    with torch.no_grad():
        feats = torch.cat(qwen_hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                          .pooler_output)
        full_ref = _hand_loss(qwen_hf(**kw).logits, ids, target)
    assert torch.allclose(res.full_loss, full_ref, atol=TOL)
    for bi, k in enumerate([1, 3]):
        drop = _first_k_drop(batch, k)
        new_ids, new_mask, cols = _shorter_rows(ids, real, drop, QWEN_IDS["pad"])
        pos = torch.zeros(3, *new_ids.shape, dtype=torch.long)
        new_target = torch.zeros_like(new_ids, dtype=torch.bool)
        for r, c in enumerate(cols):
            pos[:, r, new_ids.shape[1] - len(c):] = full_pos[:, r, c]
            new_target[r, new_ids.shape[1] - len(c):] = target[r, c]
        with torch.no_grad():
            emb = qwen_hf.get_input_embeddings()(new_ids).masked_scatter(
                (new_ids == QWEN_IDS["image"])[..., None], feats[~drop[ids == QWEN_IDS["image"]]])
            logits = qwen_hf(inputs_embeds=emb, attention_mask=new_mask, position_ids=pos).logits
        ref = _hand_loss(logits, new_ids, new_target)
        assert torch.allclose(res.loss[0, bi, 0], ref, atol=TOL), (k, res.loss[0, bi, 0], ref)
    assert res.loss[0, 0, 0].mean() > res.full_loss.mean() + 1e-3  # one token left: a real change
    assert torch.isnan(res.loss[0, :, 1:]).all()  # a deterministic strategy has one draw
    assert torch.allclose(res.kept_fraction, torch.tensor([(1 / 6 + 1 / 4) / 2, (3 / 6 + 3 / 4) / 2]))


def test_masked_budget_equals_hf_eager_4d_mask(qwen_hf, qwen_model, loss_batch):
    batch, target = loss_batch
    res = token_budget(qwen_model, loss_batch, ks=[0, 2], strategies="first", mode="masked", progress=False)
    ids, real, kw, pos = _hf_inputs(qwen_hf, batch)
    n = ids.shape[1]
    for bi, k in enumerate([0, 2]):
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
        allowed &= ~_first_k_drop(batch, k)[:, None, None, :]
        kw2 = dict(kw, attention_mask=torch.where(allowed, 0.0, torch.finfo(torch.float32).min), position_ids=pos)
        with torch.no_grad():
            ref = _hand_loss(qwen_hf(**kw2).logits, ids, target)
        assert torch.allclose(res.loss[0, bi, 0], ref, atol=TOL)


def test_forward_count_and_draw_std(qwen_model, loss_batch):
    calls = []
    qwen_model.hook_embed.add_hook(lambda x, hook: calls.append(1), is_permanent=True)
    try:
        res = token_budget(qwen_model, [loss_batch, loss_batch], fractions=[0.25, 0.5, 1.0], draws=4, seed=3,
                           progress=False)
    finally:
        qwen_model.reset_hooks(including_permanent=True)
    # per batch: the full input, the attention ranking, then one per (strategy, draw, budget)
    per_batch = 1 + 1 + (1 + 4 + 1 + 1) * 3
    assert res.n_forwards == len(calls) == 2 * per_batch
    draw_mean = res.loss[1].mean(-1)  # random: [budget, draw]
    assert torch.allclose(res.std_loss[1], draw_mean.std(-1))
    assert float(res.std_loss[1, 0]) > 0 and torch.equal(res.std_loss[0], torch.zeros(3))
    # keeping every token is the full input, whatever the strategy
    assert torch.allclose(res.loss[:, 2, 0], res.full_loss.expand(4, -1), atol=TOL)


def test_spaced_order_by_hand():
    span = ImageSpan(0, 0, 0, 16, (1, 4, 4))
    # the cell nearest the centre (first of four ties): (1, 1) = 5; farthest from it (3, 3) = 15;
    # then (0, 3) and (3, 0) tie at sqrt(5) from the nearest taken cell: the first, 3, then 12
    assert spaced_order_list(span)[:4] == [5, 15, 3, 12]
    # brute force: each next cell maximises the distance to the cells taken (ties: lowest index)
    order = spaced_order_list(span)
    pts = [(c // 4, c % 4) for c in range(16)]
    for i in range(1, 16):
        taken = order[:i]
        best = max(range(16), key=lambda c: (-1 if c in taken else min(math.dist(pts[c], pts[t]) for t in taken), -c))
        assert order[i] == best
    assert sorted(order) == list(range(16))


def spaced_order_list(span):
    return token_order("spaced", span).tolist()


def test_top_attention_order_brute_force(qwen_model, loss_batch):
    from mechvlm.analyses.token_selection import received_scores

    batch, target = loss_batch
    roles = qwen_model.roles(**batch)
    queries = roles.text & ~target
    _, cache = qwen_model.run_with_cache(**batch)
    scores = received_scores(qwen_model, batch, roles, queries)
    for s in roles.spans:
        ref = torch.zeros(s.n_tokens, dtype=torch.float64)
        for l in range(qwen_model.cfg.n_layers):
            pat = cache["pattern", l][s.row].double()  # [head, q, k]
            ref += pat[:, queries[s.row]][:, :, s.start:s.stop].sum(1).mean(0)
        assert torch.allclose(scores[s.row, s.start:s.stop], ref, atol=1e-5)
        order = token_order("top_attention", s, scores=scores[s.row, s.start:s.stop]).tolist()
        assert order == sorted(range(s.n_tokens), key=lambda i: (-float(ref[i]), i))
    with pytest.raises(ValueError, match="exactly one of"):
        token_budget(qwen_model, loss_batch, progress=False)
    with pytest.raises(ValueError, match="at least one token"):
        token_budget(qwen_model, loss_batch, ks=[0], mode="removed", progress=False)
