"""Interventions against independent HF references (patched eager attention, 4-D masks,
module hooks on HF's own layers), and their composition."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_kwargs, hf_with_attention_edit, qwen_batch, real_tokens
from mechvlm import HookedVLM
from mechvlm.interventions import (
    ablate_heads,
    insert_registers,
    knockout,
    mean_head_outputs,
    patch_activations,
    register_mask,
    skip_sublayers,
)
from mechvlm.synthetic import QWEN_IDS

TOL = 1e-4


@pytest.fixture(scope="module")
def batch():
    return qwen_batch([[3, (1, 4, 6), 5, (1, 4, 4), 6], [2, (1, 4, 4), 7]], seed=21)


def _hand_roles(batch):
    """Text (after the first image, not special) and image/EOI masks from token ids alone."""
    ids, real = batch["input_ids"], real_tokens(batch)
    image = ids == QWEN_IDS["image"]
    eoi = ids == QWEN_IDS["vision_end"]
    special = image | eoi | (ids == QWEN_IDS["vision_start"])
    first = torch.where(ids == QWEN_IDS["vision_start"], torch.arange(ids.shape[1]), ids.shape[1]).min(-1).values
    text = real & ~special & (torch.arange(ids.shape[1])[None] > first[:, None])
    return text, image, eoi


@pytest.mark.parametrize("key", ["image", "eoi"])
def test_post_softmax_knockout_equals_hf_patched(qwen_hf, qwen_model, batch, key):
    text, image, eoi = _hand_roles(batch)
    cut = (text[:, :, None] & (image if key == "image" else eoi)[:, None, :])[:, None]
    ref_model = hf_with_attention_edit(qwen_hf, None, pattern_fn=lambda w: w.masked_fill(cut, 0.0))
    hooks = knockout(qwen_model.roles(**batch), query="text", key=key, mode="post_softmax_zero")
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        out = qwen_model.run_with_hooks(**batch, fwd_hooks=hooks)
        clean = qwen_model(**batch)
    real = real_tokens(batch)
    assert (out - clean)[real].abs().max() > 1e-2
    assert (out - ref)[real].abs().max() <= TOL


@pytest.mark.parametrize("key", ["image", "eoi"])
def test_pre_softmax_knockout_equals_hf_4d_mask(qwen_hf, qwen_model, batch, key):
    text, image, eoi = _hand_roles(batch)
    ids, real = batch["input_ids"], real_tokens(batch)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    allowed &= ~(text[:, :, None] & (image if key == "image" else eoi)[:, None, :])[:, None]
    kw = hf_kwargs(batch)
    pos, _ = qwen_hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    kw.update(attention_mask=torch.where(allowed, 0.0, torch.finfo(torch.float32).min), position_ids=pos)
    hooks = knockout(qwen_model.roles(**batch), query="text", key=key, mode="pre_softmax_mask")
    with torch.no_grad():
        ref = qwen_hf(**kw).logits
        out = qwen_model.run_with_hooks(**batch, fwd_hooks=hooks)
    assert (out - ref)[real].abs().max() <= TOL
    assert not any(b.attn.needs_pattern() for b in qwen_model.blocks)


def test_knockout_layer_and_head_subset(qwen_hf, qwen_model, batch):
    text, image, _ = _hand_roles(batch)
    heads = [1, 3]
    sel = torch.zeros(qwen_model.cfg.n_heads, dtype=torch.bool)
    sel[heads] = True
    cut = (text[:, :, None] & image[:, None, :])[:, None] & sel[None, :, None, None]
    ref_model = hf_with_attention_edit(qwen_hf, [0, 2], pattern_fn=lambda w: w.masked_fill(cut, 0.0))
    roles = qwen_model.roles(**batch)
    real = real_tokens(batch)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        post = qwen_model.run_with_hooks(**batch, fwd_hooks=knockout(roles, layers=[0, 2], heads=heads))
        assert (post - ref)[real].abs().max() <= TOL
        # the pre-softmax mode on the same heads: SDPA with a per-head mask equals the
        # explicit path given the same cut as -inf-like scores
        pre = qwen_model.run_with_hooks(**batch, fwd_hooks=knockout(roles, layers=[0, 2], heads=heads,
                                                                    mode="pre_softmax_mask"))
        low = torch.finfo(torch.float32).min
        via_scores = qwen_model.run_with_hooks(**batch, fwd_hooks=[
            (f"blocks.{l}.attn.hook_attn_scores", lambda s, hook: s.masked_fill(cut, low)) for l in (0, 2)])
    assert (pre - via_scores)[real].abs().max() <= 1e-5
    with pytest.raises(ValueError, match="knockout mode"):
        knockout(roles, mode="zero")


def _hf_o_proj_input_edit(hf_model, layer, edit):
    """Deepcopy of HF with ``edit(z [b, pos, head, d_head])`` applied to the input of
    layer ``layer``'s o_proj (the per-head attention output)."""
    ref = copy.deepcopy(hf_model)
    attn = ref.model.language_model.layers[layer].self_attn
    heads, d = attn.config.num_attention_heads, attn.head_dim

    def pre(mod, args):
        z = args[0].view(*args[0].shape[:2], heads, d)
        return (edit(z).flatten(2),)

    attn.o_proj.register_forward_pre_hook(pre)
    return ref


def test_ablate_heads_zero_and_mean_equal_hf(qwen_hf, qwen_model, batch):
    real = real_tokens(batch)
    ref_model = _hf_o_proj_input_edit(qwen_hf, 1, lambda z: torch.cat([z[:, :, :2], 0 * z[:, :, 2:3], z[:, :, 3:]], 2))
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        out = qwen_model.run_with_hooks(**batch, fwd_hooks=ablate_heads({1: [2]}))
    assert (out - ref)[real].abs().max() <= TOL

    # mean ablation: the mean of HF's o_proj input over real tokens, computed on the HF side
    captured = []
    probe = copy.deepcopy(qwen_hf)
    probe.model.language_model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: captured.append(args[0]))
    with torch.no_grad():
        probe(**hf_kwargs(batch))
    z = captured[0].view(*captured[0].shape[:2], qwen_model.cfg.n_heads, -1)
    hf_mean = z[real].mean(0)
    means = mean_head_outputs(qwen_model, [batch], layers=[1])
    assert (means[1] - hf_mean).abs().max() <= 1e-5
    ref_model = _hf_o_proj_input_edit(qwen_hf, 1, lambda z: torch.cat([z[:, :, :2], hf_mean[2].expand_as(z[:, :, 2:3]), z[:, :, 3:]], 2))
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        out = qwen_model.run_with_hooks(**batch, fwd_hooks=ablate_heads([(1, 2)], mode="mean", means=means))
    assert (out - ref)[real].abs().max() <= TOL


def test_skip_sublayers_equals_hf_with_zeroed_outputs(qwen_hf, qwen_model, batch):
    image = batch["input_ids"] == QWEN_IDS["image"]
    ref_model = copy.deepcopy(qwen_hf)
    layer = ref_model.model.language_model.layers[1]
    layer.self_attn.register_forward_hook(lambda m, i, o: (o[0].masked_fill(image[:, :, None], 0.0), *o[1:]))
    layer.mlp.register_forward_hook(lambda m, i, o: o.masked_fill(image[:, :, None], 0.0))
    real = real_tokens(batch)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        out = qwen_model.run_with_hooks(**batch, fwd_hooks=skip_sublayers(qwen_model.roles(**batch).image, layers=1))
        _, cache = qwen_model.run_with_cache(**batch, names_filter=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
        clean = qwen_model(**batch)
    assert (out - clean)[real].abs().max() > 1e-3
    assert (out - ref)[real].abs().max() <= TOL
    # and with the hooks on, the residual of image tokens passes layer 1 unchanged
    with torch.no_grad(), qwen_model.hooks(fwd_hooks=skip_sublayers(image, layers=1)):
        _, c = qwen_model.run_with_cache(**batch, names_filter=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
    assert torch.equal(c["blocks.1.hook_resid_pre"][image], c["blocks.1.hook_resid_post"][image])


def test_patch_activations_equals_hf_restored_hidden_states(qwen_hf, qwen_model, batch):
    corrupt = {**batch, "pixel_values": batch["pixel_values"].flip(0)}
    image = batch["input_ids"] == QWEN_IDS["image"]
    with torch.no_grad():
        _, clean_cache = qwen_model.run_with_cache(**batch, names_filter=["blocks.2.hook_resid_pre"])
        clean_hidden = qwen_hf(**hf_kwargs(batch), output_hidden_states=True).hidden_states[2]
    ref_model = copy.deepcopy(qwen_hf)
    ref_model.model.language_model.layers[2].register_forward_pre_hook(
        lambda m, args: (torch.where(image[:, :, None], clean_hidden, args[0]), *args[1:]))
    real = real_tokens(batch)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(corrupt)).logits
        patched = qwen_model.run_with_hooks(**corrupt, fwd_hooks=patch_activations(
            clean_cache, "blocks.2.hook_resid_pre", positions=image))
        corrupted = qwen_model(**corrupt)
    assert (patched - corrupted)[real].abs().max() > 1e-3
    assert (patched - ref)[real].abs().max() <= TOL
    with pytest.raises(KeyError, match="clean cache has no"):
        patch_activations(clean_cache, "blocks.0.hook_resid_pre")


def _captured_masks(model, batch, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith("hook_attn_mask"))
    return cache


def test_register_mask_matrix_qwen(qwen_model):
    # row: t t VS I I I I VE t t   (text at 8, 9; EOI at 7)
    batch = qwen_batch([[2, (1, 4, 4), 2]], seed=0)
    cache = _captured_masks(qwen_model, batch, register_mask(qwen_model.roles(**batch)))
    n = 10
    expected = torch.ones(n, n, dtype=torch.bool).tril()
    for q in (8, 9):
        expected[q, 3:7] = False  # text cannot read the image; the EOI (7) still can
    for l in range(qwen_model.cfg.n_layers):
        assert torch.equal(cache[f"blocks.{l}.attn.hook_attn_mask"][0, 0], expected)


def test_register_mask_with_inserted_registers_and_autograd(qwen_hf):
    model = HookedVLM.from_hf(qwen_hf)
    batch = qwen_batch([[2, (1, 4, 4), 2], [1]], seed=0)
    roles = model.roles(**batch)
    ids, am, regs = insert_registers(batch["input_ids"], 3, roles=roles, token_id=QWEN_IDS["vision_end"],
                                     attention_mask=batch["attention_mask"], pad_id=QWEN_IDS["pad"])
    # row 0: t t VS I I I I VE R R R t t ; row 1: 12 pads, one text token
    assert ids.shape == (2, 13) and regs[0].nonzero().squeeze(1).tolist() == [7, 8, 9, 10]
    new = {**batch, "input_ids": ids, "attention_mask": am}
    roles2 = model.roles(**new)
    cache = _captured_masks(model, new, register_mask(roles2, registers=regs))
    expected = torch.ones(13, 13, dtype=torch.bool).tril()
    expected[11:, 3:7] = False
    assert torch.equal(cache["blocks.0.attn.hook_attn_mask"][0, 0], expected)
    # trainable: gradients reach the LM weights through the masked SDPA path
    logits = model.run_with_hooks(**new, fwd_hooks=register_mask(roles2, registers=regs))
    logits[0, -1].logsumexp(-1).backward()
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_register_mask_matrix_gemma3_keeps_bidirectional_block():
    from test_gemma3 import batch_from, make_hf

    model = HookedVLM.from_hf(make_hf(seed=0))
    batch = batch_from([[1, "image", 2]], mm=4, seed=0)  # BOS t BOI I I I I EOI t t
    cache = _captured_masks(model, batch, register_mask(model.roles(**batch)))
    n, w = 10, model.cfg.sliding_window
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    causal[3:7, 3:7] = True  # the image block sees itself both ways
    for q in (8, 9):
        causal[q, 3:7] = False
    idx = torch.arange(n)
    window = idx[None, :] > idx[:, None] - w
    for l in range(model.cfg.n_layers):
        expected = causal & window if model.cfg.window(l) else causal
        assert torch.equal(cache[f"blocks.{l}.attn.hook_attn_mask"][0, 0], expected), l


def test_composition_and_clean_restore(qwen_model, batch):
    roles = qwen_model.roles(**batch)
    real = real_tokens(batch)
    with torch.no_grad():
        clean = qwen_model(**batch)
        ko = knockout(roles, query="text", key="eoi", mode="post_softmax_zero")
        ab = ablate_heads({0: [0, 1]})
        only_ko = qwen_model.run_with_hooks(**batch, fwd_hooks=ko)
        with qwen_model.hooks(fwd_hooks=ko + ab):
            both, cache = qwen_model.run_with_cache(**batch, names_filter=["blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern"])
        after = qwen_model(**batch)
    assert (both - only_ko)[real].abs().max() > 1e-3  # the ablation took effect too
    assert (cache["blocks.0.attn.hook_z"][:, :, :2] == 0).all()  # the cache saw the ablated z
    eoi_cut = (roles.text[:, :, None] & roles.eoi[:, None, :])[:, None].expand_as(cache["blocks.1.attn.hook_pattern"])
    assert (cache["blocks.1.attn.hook_pattern"][eoi_cut] == 0).all()
    assert torch.equal(after, clean)
    assert not any(hp.fwd_hooks for hp in qwen_model.hook_dict.values())
