"""Head attribution: the fit on a planted linear effect, the per-row head ablations against
HF's own eager attention with the keys/values edited per head, and a model whose image
reaches the text through one head only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import QWEN_IDS, hf_kwargs, make_hf_qwen, qwen_batch
from torch import nn

from mechvlm import HookedVLM
from mechvlm.forward_args import VLMBatch
from mechvlm.analyses.forward_rows import last_positions, logits_at, repeat_batch
from mechvlm.analyses.head_attribution import (HeadAttributionResult, accuracy_with_heads_ablated, fit_head_attribution,
                                               head_attribution, sample_masks, top_vs_random_heads)
from mechvlm.analyses.kv_baseline import image_kv_means, place_baseline
from mechvlm.interventions import ablate_head_outputs, ablate_heads, ablate_image_kv, mean_head_outputs

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_fit_recovers_planted_head_weights():
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(3, 4, generator=g)
    true_w[0, 1] = 2.5
    masks = sample_masks(400, 3, 4, 0.3, seed=1)
    drops = (masks.float() * true_w).sum((1, 2)) + 0.4 + 0.01 * torch.randn(400, generator=g)
    fit = fit_head_attribution(masks, drops, ridge=1e-3, n_bootstrap=100)
    torch.testing.assert_close(fit["weights"], true_w, atol=0.02, rtol=0)
    assert fit["intercept"] == pytest.approx(0.4, abs=0.02)
    assert fit["r2_test"] > 0.999 and fit["r2_train"] > 0.999
    inside = (fit["ci_low"] <= true_w) & (true_w <= fit["ci_high"])
    assert inside.float().mean() >= 0.8
    assert (fit["ci_high"] - fit["ci_low"]).max() < 0.05


def _hf_with_kv_edit(hf: nn.Module, edits: dict[int, Callable]) -> nn.Module:
    """A copy of ``hf`` whose eager attention in layer ``l`` calls ``edits[l](key, value)``
    on the per-query-head keys and values (after HF's repeat_kv), ``[batch, head, pos, d]``."""
    import copy

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    ref = copy.deepcopy(hf)
    layers = ref.model.language_model.layers

    def edited(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        layer = next((l for l, lay in enumerate(layers) if lay.self_attn is module), None)
        if layer is None:  # the vision tower
            return mq.eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kw)
        key = mq.repeat_kv(key, module.num_key_value_groups)
        value = mq.repeat_kv(value, module.num_key_value_groups)
        if layer in edits:
            key, value = edits[layer](key.clone(), value.clone())
        w = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    AttentionInterface.register("mechvlm_test_kv_edit", edited)
    AttentionMaskInterface.register("mechvlm_test_kv_edit", eager_mask)
    ref.set_attn_implementation("mechvlm_test_kv_edit")
    return ref


def _hf_image_kv_means(hf, batch):
    """Mean post-RoPE keys and values per image cell over the batch's images, from HF."""
    from test_image_kv import hf_reference
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    ref = hf_reference(hf, hf_kwargs(batch), QWEN_IDS["image"], mq)
    n_img = batch["input_ids"].shape[0]
    return {l: (ref[f"key.{l}"].view(n_img, -1, *ref[f"key.{l}"].shape[1:]).mean(0),
                ref[f"value.{l}"].view(n_img, -1, *ref[f"value.{l}"].shape[1:]).mean(0))
            for l in range(len(hf.model.language_model.layers))}


@pytest.mark.parametrize("unit", ["query_head", "kv_head"])
def test_image_kv_ablation_by_row_equals_hf_with_edited_heads(qwen_hf, qwen_model, unit):
    # three rows with the image at the same positions (a per-cell mean has one RoPE position)
    batch = qwen_batch([[3, (1, 4, 4), 4]] * 3, seed=4)
    hf_means = _hf_image_kv_means(qwen_hf, batch)
    image = batch["input_ids"] == QWEN_IDS["image"]
    n_units = qwen_model.cfg.n_heads if unit == "query_head" else qwen_model.cfg.n_kv_heads
    rep = qwen_model.cfg.n_heads // qwen_model.cfg.n_kv_heads
    ablated = torch.zeros(3, qwen_model.cfg.n_layers, n_units, dtype=torch.bool)
    ablated[0, 1, 0] = ablated[0, 0, n_units - 1] = True
    ablated[1, 1, 1] = ablated[1, 2, 0] = True  # row 2: nothing ablated

    def edit(layer):
        def fn(key, value):  # [batch, head, pos, d]; a KV head's edit reaches every head of its group
            for b in range(3):
                for u in ablated[b, layer].nonzero().flatten().tolist():
                    heads = [u] if unit == "query_head" else list(range(u * rep, (u + 1) * rep))
                    for h in heads:
                        g = h // rep
                        key[b, h, image[b]] = hf_means[layer][0][:, g]
                        value[b, h, image[b]] = hf_means[layer][1][:, g]
            return key, value
        return fn

    ref = _hf_with_kv_edit(qwen_hf, {l: edit(l) for l in range(qwen_model.cfg.n_layers)})
    with torch.no_grad():
        want = ref(**hf_kwargs(batch)).logits[:, -1]
    keys, values = place_baseline(qwen_model, image_kv_means(qwen_model, batch, progress=False), batch,
                                  rotate=unit == "query_head")
    roles = qwen_model.roles(**batch)
    hooks = ablate_image_kv(ablated, roles.image, keys, values, unit=unit, attn_scale=qwen_model.cfg.attn_scale)
    got = logits_at(qwen_model, batch, hooks, last_positions(batch))
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    assert (got[0] - got[2]).abs().max() > 1e-3  # the edits do something
    # copies of the batch, each with its own masks: every row equals its own run
    two = repeat_batch(batch, 2)
    ablated2 = torch.cat([ablated, torch.zeros_like(ablated)])
    got2 = logits_at(qwen_model, two, ablate_image_kv(ablated2, roles.image, keys, values, unit=unit,
                                                       attn_scale=qwen_model.cfg.attn_scale), last_positions(two))
    torch.testing.assert_close(got2[:3], want, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got2[3:], logits_at(qwen_model, batch, [], last_positions(batch)), atol=5e-5, rtol=1e-4)


def test_output_ablation_by_row_equals_ablate_heads_per_row(qwen_model):
    batch = qwen_batch([[3, (1, 4, 4), 4], [2, (1, 4, 6), 6]], seed=6)
    means = mean_head_outputs(qwen_model, [batch])
    ablated = torch.zeros(2, qwen_model.cfg.n_layers, qwen_model.cfg.n_heads, dtype=torch.bool)
    ablated[0, 0, [1, 3]] = True
    ablated[1, 2, 2] = True
    got = logits_at(qwen_model, batch, ablate_head_outputs(ablated, means), last_positions(batch))
    for b, heads in ((0, {0: [1, 3]}), (1, {2: [2]})):
        ref_hooks = ablate_heads(heads, mode="mean", means=means)
        with torch.no_grad():
            row = VLMBatch(batch, image_token_id=qwen_model.cfg.image_token_id)[b:b + 1]
            want = qwen_model.run_with_hooks(**row, fwd_hooks=ref_hooks)[0, -1]
        torch.testing.assert_close(got[b], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ablation", ["image_kv", "output"])
def test_one_head_carries_the_image_and_is_ranked_first(ablation):
    hf = make_hf_qwen(seed=3, n_layers=2)
    model = HookedVLM.from_hf(hf)
    carrier = (1, 2)
    d = model.cfg.d_head
    with torch.no_grad():  # every other head writes nothing: the image reaches the text through one head
        for l, block in enumerate(model.blocks):
            for h in range(model.cfg.n_heads):
                if (l, h) != carrier:
                    block.attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    batches = [qwen_batch([[3, (1, 4, 4), 5]] * 4, seed=s) for s in (7, 8)]
    res = head_attribution(model, batches, n_masks=48, ablate_prob=0.3, ablation=ablation, masks_per_forward=16,
                           n_bootstrap=20, progress=False)
    assert res.ranking(by="abs")[0] == carrier
    w = res.weights.abs()
    assert w[carrier] > 0.01 and w.flatten().sort().values[-2] < 0.05 * w[carrier]
    assert res.single.abs().flatten().argmax().item() == carrier[0] * model.cfg.n_heads + carrier[1]
    assert res.n_forwards == 2 * (1 + 3) + 2 * (1 + 1)  # per batch: clean + 48/16 masks; clean + 8 single
    # more masks per forward changes nothing
    again = head_attribution(model, batches[:1], n_masks=12, ablate_prob=0.3, ablation=ablation, masks_per_forward=5,
                             n_bootstrap=0, single_head=False, attention=False, progress=False)
    one = head_attribution(model, batches[:1], n_masks=12, ablate_prob=0.3, ablation=ablation, masks_per_forward=1,
                           n_bootstrap=0, single_head=False, attention=False, progress=False)
    torch.testing.assert_close(again.drops, one.drops, atol=1e-5, rtol=1e-4)


def test_accuracy_with_the_carrier_mean_ablated_equals_hf():
    """`top_vs_random_heads` on a model whose image reaches the text through one head: the
    accuracy with the top head's output mean-ablated equals HF's, with that head's slice of
    the ``o_proj`` input replaced by its mean over the real tokens (hooks on HF modules);
    a head that writes nothing changes no prediction."""
    hf = make_hf_qwen(seed=3, n_layers=2)
    carrier, other = (1, 2), (0, 1)
    d = hf.config.text_config.hidden_size // hf.config.text_config.num_attention_heads
    layers = hf.model.language_model.layers
    with torch.no_grad():  # every other head writes nothing
        for l, layer in enumerate(layers):
            for h in range(hf.config.text_config.num_attention_heads):
                if (l, h) != carrier:
                    layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    model = HookedVLM.from_hf(hf)
    batches = [qwen_batch([[3, (1, 4, 4), 5]] * 4, seed=s) for s in (7, 8)]
    o_proj = layers[carrier[0]].self_attn.o_proj
    sl = slice(carrier[1] * d, (carrier[1] + 1) * d)

    def hf_last_logits(batch, pre_hook=None):
        handle = o_proj.register_forward_pre_hook(pre_hook) if pre_hook else None
        try:
            with torch.no_grad():
                return hf(**hf_kwargs(batch)).logits[:, -1]  # left-padded: the last column is real
        finally:
            if handle:
                handle.remove()

    total, count = 0.0, 0
    for batch in batches:  # the mean of the carrier's o_proj input over every real token
        real = batch["attention_mask"].bool()

        def grab(mod, args, real=real):
            nonlocal total, count
            total = total + args[0][..., sl][real].double().sum(0)
            count += int(real.sum())
        hf_last_logits(batch, grab)
    mean = (total / count).float()
    targets = torch.cat([hf_last_logits(b).argmax(-1) for b in batches])
    ablated = torch.cat([hf_last_logits(b, lambda mod, args: (torch.cat(
        [args[0][..., :sl.start], mean.expand_as(args[0][..., sl]), args[0][..., sl.stop:]], -1),)).argmax(-1)
        for b in batches])
    want_top = float((ablated == targets).float().mean())
    assert want_top < 1.0  # the carrier matters on these inputs

    w = torch.zeros(2, 4)
    w[carrier] = 1.0
    res = HeadAttributionResult(weights=w, ci_low=w, ci_high=w, intercept=0.0, r2_train=1.0, r2_test=1.0,
                                masks=torch.zeros(1, 2, 4, dtype=torch.bool), drops=torch.zeros(1),
                                clean=torch.zeros(8), targets=targets.float(), single=None, attention=None,
                                n_forwards=0, wall_s=0.0,
                                settings={"ablation": "output", "unit": "query_head", "per_cell": True})
    out = top_vs_random_heads(model, batches, res, targets.tolist(), k=1, n_random=2)
    assert out["top_heads"] == [carrier] and out["clean"] == 1.0
    assert out["top"] == pytest.approx(want_top, abs=1e-9)
    assert accuracy_with_heads_ablated(model, batches, [other], targets.tolist(), ablation="output") == 1.0
