"""Reliability of the forward pass: no silent wrong result, no state leaks, clear errors.

Each case failed on the code before issue 12 (see the closing note of the issue)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import make_hf_qwen, qwen_batch
from mechvlm import HookedVLM
from mechvlm.generation import greedy_generate
from mechvlm.synthetic import QWEN_IDS

NEVER = [10**9]  # an EOS id no step can produce: greedy_generate runs all its steps


def _no_hooks_left(model) -> bool:
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


# --- hook_image_embeds: an in-place edit applies once per forward -------------------------

@pytest.mark.parametrize("cache", [False, True], ids=["no_cache", "kv_cache"])
def test_in_place_edit_of_image_embeds_does_not_compound_over_generation(qwen_model, image_batch, cache):
    reference = float(qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
                      .abs().mean())
    seen = []

    def halve_in_place(t, hook):
        seen.append(float(t.abs().mean()))
        t.mul_(0.5)

    greedy_generate(qwen_model, image_batch, 3, NEVER, fwd_hooks=[("hook_image_embeds", halve_in_place)],
                    use_past_kv_cache=cache)
    # without a cache every step re-reads the images; with it only the prefill holds them
    assert len(seen) == (1 if cache else 3)
    # every step sees the vision output itself, not the previous step's halved copy
    assert seen == pytest.approx([reference] * len(seen), rel=1e-6)


def test_callers_image_embeds_are_never_mutated(qwen_model, image_batch):
    feats = qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
    before = feats.clone()
    with torch.no_grad():
        edited = qwen_model.run_with_hooks(**image_batch, image_embeds=feats,
                                           fwd_hooks=[("hook_image_embeds", lambda t, hook: t.mul_(0.5))])
        expected = qwen_model(**image_batch, image_embeds=before * 0.5)  # the edit, applied by hand
    assert torch.equal(feats, before)
    torch.testing.assert_close(edited, expected, atol=0, rtol=0)


# --- image_embeds that cannot be this batch's vision output are refused ------------------

def test_transposed_image_embeds_are_refused(qwen_model, image_batch):
    feats = qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
    n, d = feats.shape
    with pytest.raises(ValueError, match=rf"image_embeds has shape \({d}, {n}\).*\[{n}, {d}\].*transposed"):
        qwen_model(**image_batch, image_embeds=feats.T.contiguous())
    with pytest.raises(ValueError, match=rf"image_embeds has shape \(1, {n}, {d}\)"):
        qwen_model(**image_batch, image_embeds=feats[None])


def test_meta_image_embeds_are_refused(qwen_model, image_batch):
    feats = qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
    with pytest.raises(ValueError, match="image_embeds is on the meta device"):
        qwen_model(**image_batch, image_embeds=torch.empty_like(feats, device="meta"))


def test_image_embeds_without_image_tokens_are_refused(qwen_model, image_batch):
    feats = qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
    with pytest.raises(ValueError, match="no image token"):
        qwen_model(torch.tensor([[5, 6, 7]]), image_embeds=feats)


# --- from_hf does not carry the user's hooks on the HF vision tower ----------------------

def test_from_hf_drops_forward_and_backward_hooks_of_the_hf_vision_tower():
    hf = make_hf_qwen(seed=3, n_layers=2)
    clean = HookedVLM.from_hf(copy.deepcopy(hf))  # reference: built before any hook exists
    calls = []
    hf.model.visual.merger.register_forward_hook(lambda m, i, o: o * 2.0)  # would double the features
    hf.model.visual.blocks[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    hf.model.visual.merger.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))
    model = HookedVLM.from_hf(hf)
    batch = qwen_batch([[3, (1, 4, 6), 4]], seed=3)
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    logits = model(**{**batch, "pixel_values": pixels})
    logits.sum().backward()
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), clean(**batch), atol=0, rtol=0)
    # the user's HF model keeps its hooks
    assert hf.model.visual.merger._forward_hooks and hf.model.visual.blocks[0]._forward_pre_hooks


# --- hooks added inside a hooks() context are scoped to it --------------------------------

def test_hook_added_inside_a_hook_is_gone_when_the_context_exits(qwen_model, image_batch):
    fired = []

    def adder(t, hook):
        qwen_model.add_hook("blocks.1.hook_resid_post", lambda t, hook: fired.append(hook.name))

    with torch.no_grad():
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.0.hook_resid_post", adder)])
        assert _no_hooks_left(qwen_model)
        with qwen_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", adder)]):
            qwen_model(**image_batch)
        assert _no_hooks_left(qwen_model)
        n = len(fired)
        qwen_model(**image_batch)  # no leftover hook fires
        assert len(fired) == n
        _, cache = qwen_model.run_with_cache(**image_batch, names_filter="hook_embed")
        assert _no_hooks_left(qwen_model)


def test_hooks_added_outside_a_context_or_permanent_stay(qwen_model, image_batch):
    try:
        qwen_model.add_hook("hook_embed", lambda t, hook: None, is_permanent=True)
        with qwen_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: None)]):
            pass
        assert qwen_model.hook_embed.fwd_hooks  # a permanent hook is not the context's
    finally:
        qwen_model.reset_hooks(including_permanent=True)
    assert _no_hooks_left(qwen_model)


# --- bad fwd_hooks forms -------------------------------------------------------------------

def test_bad_fwd_hooks_forms_get_a_type_error_naming_the_form(qwen_model, image_batch):
    from mechvlm import attention_share

    fn = lambda t, hook: None  # noqa: E731
    with pytest.raises(TypeError, match=r"list of \(hook_name, fn\) pairs.*one pair.*wrap it in a list"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=("hook_embed", fn))
    with pytest.raises(TypeError, match=r"list of \(hook_name, fn\) pairs.*got a dict"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks={"hook_embed": fn})
    with pytest.raises(TypeError, match=r"list of \(hook_name, fn\) pairs.*got function"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=fn)
    with pytest.raises(TypeError, match="must be callable"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("hook_embed", "not a function")])
    with pytest.raises(TypeError, match="got a dict"):
        attention_share(qwen_model, image_batch, fwd_hooks={"hook_embed": fn}, progress=False)
    assert _no_hooks_left(qwen_model)


# --- longer than max_position_embeddings: one warning --------------------------------------

def test_sequences_longer_than_max_position_embeddings_warn_once():
    model = HookedVLM.from_hf(make_hf_qwen(seed=2, n_layers=1, max_position_embeddings=16))
    assert model.cfg.n_ctx == 16
    ids = torch.tensor([[5 + i % 20 for i in range(20)]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids[:, :16])  # at the limit: fine
            model(ids)
            model(ids)
    msgs = [str(w.message) for w in caught if "max_position_embeddings" in str(w.message)]
    assert len(msgs) == 1 and "20 positions" in msgs[0] and "= 16" in msgs[0], msgs
    assert QWEN_IDS["image"] not in ids
