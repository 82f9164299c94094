"""TransformerLens parity of HookedVLM, each number against an independent reference:
HF's own model, a cross-entropy written out by hand, direct runs with hand-written hooks,
W_U columns indexed by hand."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
from _tl_models import FAMILIES, image_batch, scene_images, toy_model
from transformer_lens import FactoredMatrix, patching
from transformer_lens.model_protocol import TransformerLensModel

from mechvlm import UnfoldedNormError
from mechvlm.toy.checkpoint import SHIPPED


def hf_logits(family: str, batch) -> torch.Tensor:
    hf_class = getattr(transformers, toy_model(family).family.hf_class_name)
    hf = hf_class.from_pretrained(str(SHIPPED[family]), dtype=torch.float32).eval()
    is_image = (batch["input_ids"] == hf.config.image_token_id).long()
    extra = {"mm_token_type_ids": is_image} if family == "qwen2_5_vl" else {"token_type_ids": is_image}
    kw = {k: v for k, v in batch.items() if k != "target_mask"}
    with torch.no_grad():
        return hf(**kw, **extra).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_ln_keeps_hf_logits_and_leaves_weight_free_norms(family):
    folded, raw = toy_model(family, fold_ln=True), toy_model(family, fold_ln=False)
    batch = image_batch(folded, ["What color is the shape?", "How many shapes are there?"])
    ref = hf_logits(family, batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = (folded(batch) - ref)[real].abs().max()
    assert diff < 1e-4, diff
    # the norms are TL's RMSPre: their output is x / scale, read back from the hooks
    _, cache = folded.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.1.ln1") or "resid_pre" in n)
    x = cache["blocks.1.hook_resid_pre"]
    assert torch.allclose(cache["blocks.1.ln1.hook_normalized"], x / cache["blocks.1.ln1.hook_scale"], atol=1e-6)
    # the final norm's weight is in W_U (Gemma3: 1 + w), the embedding is untouched
    w = raw.ln_final.w.detach().float() + (1.0 if family == "gemma3" else 0.0)
    assert torch.allclose(folded.W_U, raw.W_U * w[:, None], atol=1e-6)
    assert torch.equal(folded.W_E, raw.W_E)
    assert folded.cfg.normalization_type == "RMSPre" and folded.blocks[0].ln1_post is (
        None if family == "qwen2_5_vl" else folded.blocks[0].ln1_post)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_attrs_of_full_decomposition_sum_to_logit_difference(family):
    model = toy_model(family, fold_ln=True)
    batch = image_batch(model)
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch)
    finally:
        model.set_use_attn_result(False)
    top = logits[0, -1].topk(2).indices
    logit_diff = logits[0, -1, top[0]] - logits[0, -1, top[1]]
    for expand in (False, True):
        stack, labels = cache.get_full_resid_decomposition(expand_neurons=expand, pos_slice=-1, return_labels=True)
        attrs = cache.logit_attrs(stack, tokens=top[:1], incorrect_tokens=top[1:], pos_slice=-1)
        assert len(labels) == stack.shape[0]
        assert abs(float(attrs.sum() - logit_diff)) <= 1e-4, (expand, float(attrs.sum()), float(logit_diff))
    # the same from z @ W_O (no hook_result cached): the cache rebuilds the head results
    with torch.no_grad():
        _, cache2 = model.run_with_cache(batch)
    stack2 = cache2.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
    attrs2 = cache2.logit_attrs(stack2, tokens=top[:1], incorrect_tokens=top[1:], pos_slice=-1)
    assert abs(float(attrs2.sum() - logit_diff)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_helpers_raise_without_fold_ln(family):
    model = toy_model(family, fold_ln=False)
    with torch.no_grad():
        logits, cache = model.run_with_cache(image_batch(model))
    top = logits[0, -1].topk(2).indices
    with pytest.raises(UnfoldedNormError, match="fold_ln"):
        cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=top[:1], pos_slice=-1)
    with pytest.raises(UnfoldedNormError):
        cache.accumulated_resid(layer=2, apply_ln=True)  # ln1 of block 2: cached scale, weight missing
    # the logit lens that re-runs ln_final itself (with its weight) stays allowed
    cache.accumulated_resid(apply_ln=True)
    cache.apply_ln_to_stack(cache.accumulated_resid(pos_slice=-1), pos_slice=-1, recompute_ln=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_hand_cross_entropy(family):
    model = toy_model(family, fold_ln=False)
    ims = scene_images()
    batch = model.to_inputs(["What color is the shape?", "How many shapes are there?"], [[ims[0]], [ims[1]]],
                            targets=["red", "two"])
    with torch.no_grad():
        logits = model(batch)
        loss = model(batch, return_type="loss")
        per_token = model(batch, return_type="loss", loss_per_token=True)
        logits2, loss2 = model(batch, return_type="both")
        full = model({k: v for k, v in batch.items() if k != "target_mask"}, return_type="loss")
    ids, am, tm = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
    terms, all_terms = [], []
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            real = am[b, t] == 1 and am[b, t - 1] == 1 and ids[b, t] != model.cfg.image_token_id
            if not real:
                continue
            row = logits[b, t - 1].double()
            nll = float(torch.logsumexp(row, 0) - row[ids[b, t]])
            all_terms.append(nll)
            if tm[b, t]:
                terms.append(nll)
                assert abs(float(per_token[b, t - 1]) - nll) < 1e-4
    assert len(terms) == 4  # "red" + end of turn, "two" + end of turn
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-5
    assert abs(float(full) - sum(all_terms) / len(all_terms)) < 1e-5
    assert torch.equal(logits2, logits) and torch.equal(loss2, loss)
    assert per_token.shape == (ids.shape[0], ids.shape[1] - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_and_start_at_layer_compose_with_hooks(family):
    model = toy_model(family, fold_ln=False)
    batch = image_batch(model, ["What color is the shape?", "How many shapes are there?"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for l in (0, 2, -1):
            assert torch.allclose(model(batch, stop_at_layer=l), cache["resid_pre", l], atol=1e-6)
        resid = torch.randn_like(cache["resid_pre", 2])
        # reference: a full run whose blocks.2 input is replaced by a hook
        ref = model.run_with_hooks(batch, fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, hook: resid)])
        tl_form = model(resid, start_at_layer=2, tokens=batch)
        kw_form = model(batch, start_at_layer=2, resid=resid)
        assert torch.allclose(tl_form, ref, atol=1e-5) and torch.allclose(kw_form, ref, atol=1e-5)
        # hooks of the blocks that run fire and their edits count
        kill = lambda t, hook: torch.zeros_like(t)  # noqa: E731
        ref_k = model.run_with_hooks(batch, fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, hook: resid),
                                                       ("blocks.3.hook_attn_out", kill)])
        out_k = model.run_with_hooks(resid, start_at_layer=2, tokens=batch, fwd_hooks=[("blocks.3.hook_attn_out", kill)])
        assert torch.allclose(out_k, ref_k, atol=1e-5) and not torch.allclose(out_k, tl_form, atol=1e-3)
        with pytest.raises(ValueError, match="resid has shape"):
            model(resid[:, 1:], start_at_layer=2, tokens=batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_tl_patching_on_image_pair_equals_direct_runs(family):
    model = toy_model(family, fold_ln=False)
    clean = image_batch(model, image_index=0, with_image_embeds=True)
    corrupt = image_batch(model, image_index=1, with_image_embeds=True)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupt_logits = model(corrupt)
    answer = int(clean_logits[0, -1].argmax())
    metric = lambda logits: logits[0, -1, answer]  # noqa: E731
    n, pos = model.cfg.n_layers, clean["input_ids"].shape[1]
    text = int((corrupt["input_ids"][0] != model.cfg.image_token_id).nonzero()[1])
    image_pos = int((corrupt["input_ids"][0] == model.cfg.image_token_id).nonzero()[3])
    cells = [(0, text), (0, image_pos), (1, image_pos), (2, pos - 1), (n - 1, pos - 1)]
    with torch.no_grad():
        post = patching.generic_activation_patch(
            model, corrupt, clean_cache, metric, patch_setter=patching.layer_pos_patch_setter,
            activation_name="resid_post", index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
        pre = patching.generic_activation_patch(
            model, corrupt, clean_cache, metric, patch_setter=patching.layer_pos_patch_setter,
            activation_name="resid_pre", index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, metric)
    assert heads.shape == (n, model.cfg.n_heads)
    # endpoints: the last residual at the last position is the clean run's; a text position of the
    # embedding (same prompt, other image) is the corrupted run's
    assert abs(float(post[-1] - metric(clean_logits))) < 1e-4
    assert abs(float(pre[0] - metric(corrupt_logits))) < 1e-4
    assert abs(float(pre[1] - metric(corrupt_logits))) > 1e-3  # the image matters
    # and every cell is a direct run with a hand-written patch
    for i, (layer, p) in enumerate(cells):
        for name, result in ((f"blocks.{layer}.hook_resid_pre", pre), (f"blocks.{layer}.hook_resid_post", post)):
            def put(t, hook, p=p, name=name):
                t = t.clone()
                t[:, p] = clean_cache[name][:, p]
                return t
            with torch.no_grad():
                direct = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, put)]))
            assert abs(float(result[i] - direct)) < 1e-5, (name, p)
    for layer, head in ((0, 1), (n - 1, 2)):
        def put_head(t, hook, head=head, layer=layer):
            t = t.clone()
            t[:, :, head] = clean_cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
            return t
        with torch.no_grad():
            direct = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", put_head)]))
        assert abs(float(heads[layer, head] - direct)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_stacks_follow_tl_gqa_convention(family):
    model = toy_model(family, fold_ln=True)
    cfg = model.cfg
    rep = cfg.n_heads // cfg.n_kv_heads
    L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    assert model.W_K.shape == model.W_V.shape == model.W_Q.shape == (L, H, d, dh)
    assert model._W_K.shape == (L, cfg.n_kv_heads, d, dh) and model.W_O.shape == (L, H, dh, d)
    assert model.W_in.shape == model.W_gate.shape == (L, d, cfg.d_mlp) and model.W_out.shape == (L, cfg.d_mlp, d)
    assert model.b_K.shape == (L, H, dh) and model.b_O.shape == (L, d) and model.b_U.shape == (cfg.d_vocab,)
    # query head h reads KV head h // rep: check against the keys the model computes (hook_k)
    batch = image_batch(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.1.") and
                                        (n.endswith("hook_k") or n.endswith("ln1.hook_normalized")))
    x = cache["blocks.1.ln1.hook_normalized"]
    k = cache["blocks.1.attn.hook_k"]
    for h in range(H):
        mine = x @ model.blocks[1].attn.k_proj.weight.view(cfg.n_kv_heads, dh, d)[h // rep].T
        if model.blocks[1].attn.k_proj.bias is not None:
            mine = mine + model.blocks[1].attn.k_proj.bias.view(cfg.n_kv_heads, dh)[h // rep]
        via_tl = x @ model.blocks[1].attn.W_K[h] + model.blocks[1].attn.b_K[h]
        assert torch.allclose(via_tl, mine, atol=1e-5)
        if family == "qwen2_5_vl":  # Gemma3's k_norm acts after the projection
            assert torch.allclose(via_tl, k[0, :, h // rep], atol=1e-5)
    qk = model.blocks[1].attn.QK
    assert isinstance(qk, FactoredMatrix)
    assert torch.allclose(qk.AB, model.W_Q[1] @ model.W_K[1].transpose(-1, -2), atol=1e-6)
    assert torch.allclose(model.OV.AB[1, 3], model.W_V[1, 3] @ model.W_O[1, 3], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_and_residual_directions(family):
    model = toy_model(family)
    tok = model.tokenizer
    assert isinstance(model, TransformerLensModel)
    text = "What color is the shape?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = ([tok.bos_token_id] if model.cfg.default_prepend_bos else []) + ids
    assert model.to_tokens(text).tolist() == [expected]
    assert model.to_tokens(text, prepend_bos=False).tolist() == [ids]
    assert model.to_str_tokens(text, prepend_bos=False) == [tok.decode([i]) for i in ids]
    assert model.to_single_token("red") == tok.convert_tokens_to_ids("red")
    assert model.get_token_position("red", "the red shape", prepend_bos=False) == 1
    batch = image_batch(model)
    strs = model.to_str_tokens(batch["input_ids"][0], image_grid_thw=batch.get("image_grid_thw"))
    assert strs.count("<image 0: 4x4>") == 1 and len(strs) == batch["input_ids"].shape[1] - 15
    assert len(model.to_str_tokens(batch["input_ids"][0], expand_images=True)) == batch["input_ids"].shape[1]
    W_U = model.W_U
    red, blue = model.to_single_token("red"), model.to_single_token("blue")
    assert torch.equal(model.tokens_to_residual_directions(red), W_U[:, red])
    assert torch.equal(model.tokens_to_residual_directions("red"), W_U[:, red])
    assert torch.equal(model.tokens_to_residual_directions(torch.tensor([red, blue])), torch.stack([W_U[:, red], W_U[:, blue]]))
    two_d = model.tokens_to_residual_directions(torch.tensor([[red, blue], [blue, blue]]))
    assert two_d.shape == (2, 2, model.cfg.d_model) and torch.equal(two_d[0, 1], W_U[:, blue])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_takes_batch_mapping_and_hf_batchfeature(family):
    model = toy_model(family, fold_ln=False)
    batch = image_batch(model)
    with torch.no_grad():
        ref = model(**batch)
        assert torch.equal(model(batch), ref)
        assert torch.equal(model(transformers.BatchFeature(dict(batch))), ref)
        assert torch.equal(model.run_with_hooks(batch, fwd_hooks=[]), ref)
    with pytest.raises(TypeError, match="both in the batch"):
        model(batch, attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_embeds_cache_slices_by_row(family):
    model = toy_model(family, fold_ln=False)
    batch = image_batch(model, ["What color is the shape?", "How many shapes are there?"])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=["hook_image_embeds", "hook_embed"])
        one = image_batch(model, ["How many shapes are there?"], image_index=1)
        own = model.encode_images(one["pixel_values"], one.get("image_grid_thw"))
    n = own.shape[0]
    assert cache["hook_image_embeds"].shape == (2 * n, model.cfg.d_model)
    row1 = cache.apply_slice_to_batch_dim(1)
    assert row1["hook_image_embeds"].shape == (n, model.cfg.d_model)
    assert torch.allclose(row1["hook_image_embeds"], own, atol=1e-5)
    assert row1["hook_embed"].shape == batch["input_ids"].shape[1:] + (model.cfg.d_model,)
    assert torch.allclose(cache.image_embeds_by_row(1), own, atol=1e-5)
    with torch.no_grad():  # a cache holding nothing batch-major still knows its rows
        _, only = model.run_with_cache(batch, names_filter="hook_image_embeds")
    assert torch.allclose(only.apply_slice_to_batch_dim(1)["hook_image_embeds"], own, atol=1e-5)
    first = cache.apply_slice_to_batch_dim([0])
    assert first["hook_image_embeds"].shape == (n, model.cfg.d_model) and first.has_batch_dim
    with torch.no_grad():
        _, single = model.run_with_cache(one, names_filter="hook_image_embeds")
    single.remove_batch_dim()
    assert single["hook_image_embeds"].shape == (n, model.cfg.d_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_opt_in_hooks_list_hooks_and_incl_bwd(family):
    model = toy_model(family, fold_ln=False)
    batch = image_batch(model)
    with torch.no_grad():
        ref = model(batch)
    b, p = batch["input_ids"].shape
    cfg = model.cfg
    for switch, name, shape in ((model.set_use_split_qkv_input, "blocks.1.hook_k_input", (b, p, cfg.n_kv_heads, cfg.d_model)),
                                (model.set_use_attn_in, "blocks.1.hook_attn_in", (b, p, cfg.n_heads, cfg.d_model)),
                                (model.set_use_hook_mlp_in, "blocks.1.hook_mlp_in", (b, p, cfg.d_model))):
        switch(True)
        try:
            with torch.no_grad():
                out, cache = model.run_with_cache(batch, names_filter=name)
            assert cache[name].shape == shape and torch.allclose(out, ref, atol=1e-5)
            if name.endswith("attn_in"):  # an edit of one head's copy takes effect
                def zero_head(t, hook):
                    t = t.clone()
                    t[:, :, 1] = 0
                    return t
                with torch.no_grad():
                    edited = model.run_with_hooks(batch, fwd_hooks=[(name, zero_head)])
                assert not torch.allclose(edited, ref, atol=1e-4)
        finally:
            switch(False)
    assert not any(n.endswith(("_input", "attn_in", "mlp_in")) for n in model.hook_dict)

    def my_hook(t, hook):
        return None
    model.add_hook("blocks.0.hook_resid_post", my_hook)
    try:
        assert model.list_hooks()["blocks.0.hook_resid_post"][0].user_hook is my_hook
    finally:
        model.reset_hooks()
    loss, cache = model.run_with_cache(batch, return_type="loss", incl_bwd=True,
                                       names_filter=["blocks.1.hook_resid_post"])
    # reference gradient by autograd on a captured activation
    held = {}

    def keep(t, hook):
        t.retain_grad()
        held["x"] = t
    loss2 = model.run_with_hooks(batch, return_type="loss", fwd_hooks=[("blocks.1.hook_resid_post", keep)])
    loss2.backward()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(cache["blocks.1.hook_resid_post_grad"], held["x"].grad, atol=1e-6)
