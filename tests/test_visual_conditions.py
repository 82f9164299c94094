"""The ``prune:`` / ``skip:`` / ``inject:`` MMBench conditions: what their hooks and batches do
at the first generation step, against HF references, and through generation."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_kwargs, qwen_batch, real_tokens
from mechvlm.generation import greedy_generate
from mechvlm.mmbench.conditions import condition_by_name, resolve_conditions
from mechvlm.synthetic import QWEN_IDS
from test_injection import manual_injection

TOL = 1e-4


@pytest.fixture(scope="module")
def batch():
    return qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=81)


def _first_step(model, cond, batch):
    b, hooks = cond.setup(model, batch)
    hooks = hooks(b, model.roles(**b)) if callable(hooks) else (hooks or [])
    with torch.no_grad():
        return b, model.run_with_hooks(**b, fwd_hooks=list(hooks))


def test_names_resolve():
    names = ["prune:dead", "prune:sink+dead:keys", "prune:alive:keys:threshold=6", "skip:mlp:0-8",
             "skip:attn+mlp:1+3", "inject:8", "inject:2:alive"]
    conds = resolve_conditions(names)
    assert list(conds) == names and all(c.prepare is not None for c in conds.values())
    for bad, msg in [("prune:nothing", "unknown token categories"), ("prune:dead:sideways", "mode must be"),
                     ("prune:dead:keys:tau=3", "unknown option"), ("skip:ffn:1", "expected skip"),
                     ("skip:mlp:3-1", "bad layer range"), ("inject:x", "expected inject")]:
        with pytest.raises(ValueError, match=msg):
            condition_by_name(bad)


def test_skip_condition_equals_hf_with_zeroed_mlp(qwen_hf, qwen_model, batch):
    image = batch["input_ids"] == QWEN_IDS["image"]
    ref_model = copy.deepcopy(qwen_hf)
    for l in (1, 2):
        ref_model.model.language_model.layers[l].mlp.register_forward_hook(
            lambda m, i, o: o.masked_fill(image[:, :, None], 0.0))
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
    _, ours = _first_step(qwen_model, condition_by_name("skip:mlp:1-2"), batch)
    assert (ours - ref)[real_tokens(batch)].abs().max() <= TOL
    with pytest.raises(ValueError, match="layer 8 does not exist"):
        condition_by_name("skip:mlp:0-8").setup(qwen_model, batch)


def test_inject_condition_equals_manual_run(qwen_hf, qwen_model, batch):
    ref = manual_injection(qwen_hf, batch, 2)
    _, ours = _first_step(qwen_model, condition_by_name("inject:2"), batch)
    assert (ours - ref)[real_tokens(batch)].abs().max() <= TOL


def test_prune_dead_removed_and_keys(qwen_hf, qwen_model, batch):
    ids, real = batch["input_ids"], real_tokens(batch)
    feats = qwen_model.encode_images(batch["pixel_values"], batch["image_grid_thw"]).clone()
    feats[[1, 7]] = 0.0  # two planted zero tokens: dead by their norm
    b = dict(batch, image_embeds=feats)
    image_pos = (ids == QWEN_IDS["image"]).nonzero()
    drop = torch.zeros_like(ids, dtype=torch.bool)
    for i in (1, 7):
        drop[tuple(image_pos[i])] = True
    # reference: HF eager with those two tokens masked as keys (for Qwen, removal is the same)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & real[:, None, None, :] & ~drop[:, None, None, :]
    kw = hf_kwargs(batch)
    pos, _ = qwen_hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    emb = qwen_hf.get_input_embeddings()(ids).masked_scatter((ids == QWEN_IDS["image"])[..., None], feats)
    with torch.no_grad():
        ref = qwen_hf(inputs_embeds=emb, attention_mask=torch.where(allowed, 0.0, torch.finfo(torch.float32).min),
                      position_ids=pos).logits
    keys_batch, keys = _first_step(qwen_model, condition_by_name("prune:dead:keys:threshold=5"), b)
    assert keys_batch is b and (keys - ref)[real].abs().max() <= TOL
    removed_batch, removed = _first_step(qwen_model, condition_by_name("prune:dead:threshold=5"), b)
    assert int((removed_batch["input_ids"] == QWEN_IDS["image"]).sum()) == int(image_pos.shape[0]) - 2
    assert (removed[:, -1] - ref[:, -1]).abs().max() <= TOL
    # through generation: both readings give the same tokens (Qwen keeps the grid positions)
    eos = [QWEN_IDS["eos"]]
    gens = []
    for name in ("prune:dead:keys:threshold=5", "prune:dead:threshold=5"):
        gb, hooks = condition_by_name(name).setup(qwen_model, b)
        gens.append(greedy_generate(qwen_model, gb, 4, eos, fwd_hooks=hooks, output_logits=True))
    assert torch.equal(gens[0].new_tokens, gens[1].new_tokens)
    assert (gens[0].logits - gens[1].logits).abs().max() <= TOL
