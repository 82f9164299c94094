"""The ``post_softmax_zero`` knockout without a materialised pattern (SDPA over the kept keys,
rows rescaled by the mass they kept) against the explicit softmax it replaces: the pattern
is materialised again whenever another hook reads ``hook_pattern``, and both agree within
fp32 tolerance (the HF reference of the explicit path is in test_interventions.py). Both
families: GQA, left padding, two images, Gemma3's bidirectional block under a window."""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm import HookedVLM
from mechvlm.interventions import knockout
from test_generation_cache import GEMMA_ROWS, gemma_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def qwen_inputs():
    return {k: v for k, v in qwen_batch([[3, (1, 4, 6), 5, (1, 4, 4), 6], [2, (1, 4, 4), 7]], seed=21).items()
            if v is not None}


def _observe(t, hook):
    """A hook at hook_pattern that only reads it: the layer must materialise its pattern."""
    return None


def _explicit_calls(model, monkeypatch) -> list[int]:
    calls = []
    for l, block in enumerate(model.blocks):
        orig = block.attn._explicit
        monkeypatch.setattr(block.attn, "_explicit", lambda *a, _o=orig, _l=l, **k: calls.append(_l) or _o(*a, **k))
    return calls


KNOCKOUTS = {
    "text_image_all": dict(query="text", key="image"),
    "text_eoi_heads": dict(query="text", key="eoi", layers=[0, 2], heads=[1, 3]),
    "image_image": dict(query="image", key="image", layers=[1]),  # most rows lose keys: chunks of rows
}


@pytest.mark.parametrize("kind", KNOCKOUTS)
def test_bounded_equals_explicit_qwen(qwen_model, qwen_inputs, kind, monkeypatch):
    hooks = knockout(qwen_model.roles(**qwen_inputs), mode="post_softmax_zero", **KNOCKOUTS[kind])
    observers = [(n, _observe) for n, _ in hooks]  # after the cut: it edits the real pattern first
    monkeypatch.setattr("mechvlm.components.post_softmax.ROW_CHUNK_ELEMENTS", 64 * 6 * 4)
    calls = _explicit_calls(qwen_model, monkeypatch)
    with torch.no_grad():
        bounded = qwen_model.run_with_hooks(**qwen_inputs, fwd_hooks=hooks)
        assert calls == []  # no pattern materialised
        explicit = qwen_model.run_with_hooks(**qwen_inputs, fwd_hooks=hooks + observers)
        assert calls  # the observer brought the explicit path back
        clean = qwen_model(**qwen_inputs)
    real = qwen_inputs["attention_mask"].bool()
    diff = (bounded - explicit)[real].abs().max().item()
    print(f"\n[post_softmax_zero bounded vs explicit, qwen {kind}] max |logits diff| {diff:.1e}")
    assert diff <= TOL and (bounded - clean)[real].abs().max() > 1e-2


def test_bounded_equals_explicit_gemma3_window_and_block(monkeypatch):
    from transformers import Gemma3ForConditionalGeneration

    from mechvlm.synthetic import gemma3_config

    torch.manual_seed(0)
    cfg = gemma3_config(n_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        mm_tokens=16, sliding_window=6)  # the image block is longer than the window
    model = HookedVLM.from_hf(Gemma3ForConditionalGeneration._from_config(cfg).eval())
    batch = gemma_batch(GEMMA_ROWS["left_padded"], seed=4)
    roles = model.roles(**batch)
    real = batch["attention_mask"].bool()
    calls = _explicit_calls(model, monkeypatch)
    for spec in (dict(query="text", key="image"), dict(query="image", key="image", heads=[0])):
        hooks = knockout(roles, mode="post_softmax_zero", **spec)
        calls.clear()
        with torch.no_grad():
            bounded = model.run_with_hooks(**batch, fwd_hooks=hooks)
            assert calls == []
            explicit = model.run_with_hooks(**batch, fwd_hooks=hooks + [(n, _observe) for n, _ in hooks])
            clean = model(**batch)
        assert calls and (bounded - explicit)[real].abs().max() <= TOL
        assert (bounded - clean)[real].abs().max() > 1e-3


def test_pattern_cache_and_user_hooks_see_the_zeroed_pattern(qwen_model, qwen_inputs):
    roles = qwen_model.roles(**qwen_inputs)
    hooks = knockout(roles, "text", "image", mode="post_softmax_zero")
    cut = (roles.text[:, :, None] & roles.image[:, None, :])[:, None]
    with torch.no_grad():
        bounded = qwen_model.run_with_hooks(**qwen_inputs, fwd_hooks=hooks)
        with qwen_model.hooks(fwd_hooks=hooks):
            logits, cache = qwen_model.run_with_cache(**qwen_inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    for l in range(qwen_model.cfg.n_layers):
        pattern = cache["pattern", l]
        assert (pattern.masked_select(cut.expand_as(pattern)) == 0).all()
        rowsum = pattern.sum(-1)
        assert rowsum[roles.text[:, None].expand_as(rowsum)].max() < 1 - 1e-3  # not renormalised
    real = qwen_inputs["attention_mask"].bool()
    assert (logits - bounded)[real].abs().max() <= TOL


def test_bounded_bf16_and_gradients(qwen_hf, qwen_inputs):
    roles_model = HookedVLM.from_hf(qwen_hf)
    hooks = knockout(roles_model.roles(**qwen_inputs), "text", "image", mode="post_softmax_zero")
    observers = [(n, _observe) for n, _ in hooks]
    bf16 = HookedVLM.from_hf(qwen_hf, dtype=torch.bfloat16)
    with torch.no_grad():
        a = bf16.run_with_hooks(**qwen_inputs, fwd_hooks=hooks).float()
        b = bf16.run_with_hooks(**qwen_inputs, fwd_hooks=hooks + observers).float()
    real = qwen_inputs["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 0.1 * b[real].abs().max()
    grads = []
    for extra in ([], observers):
        roles_model.zero_grad()
        out = roles_model.run_with_hooks(**qwen_inputs, fwd_hooks=hooks + extra)
        out[real].square().mean().backward()
        grads.append(roles_model.blocks[0].attn.q_proj.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[1].abs().max() + 1e-7
