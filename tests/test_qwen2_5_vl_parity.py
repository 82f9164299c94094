"""HookedVLM(Qwen2.5-VL) against Hugging Face's own model: logits, residuals, patterns."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import hf_kwargs, make_hf_qwen, qwen_batch, real_tokens
from mechvlm import HookedVLM

FP32_TOL = 1e-4

CASES = {
    "text_only": [[12]],
    "one_image": [[4, (1, 4, 6), 6]],
    "two_images_different_grids": [[3, (1, 4, 6), 5, (1, 6, 4), 4]],
    "left_padded_batch": [[4, (1, 4, 6), 6], [2, (1, 4, 4), 3]],
    "padded_batch_text_row": [[4, (1, 4, 4), 6], [5]],
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_eager(qwen_hf, qwen_model, case):
    batch = qwen_batch(CASES[case], seed=3)
    with torch.no_grad():
        kw = hf_kwargs(batch)
        if "image_grid_thw" not in batch and batch["attention_mask"] is not None:
            # text-only: HF then uses arange over pads; give it the real-token positions
            kw["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        ref = qwen_hf(**kw).logits
        out = qwen_model(**batch)
    real = real_tokens(batch)
    assert out.shape == ref.shape
    diff = (out - ref)[real].abs().max().item()
    assert diff <= FP32_TOL, f"{case}: max abs diff {diff:.3g}"
    assert ref[real].abs().max() > 0.5  # the comparison is not between near-zero tensors


def test_hf_without_mm_token_type_ids_differs(qwen_hf, qwen_model, image_batch):
    """The HF trap: without mm_token_type_ids HF silently uses 1-D positions. mechvlm
    always builds 3-D positions, so it must NOT match that output."""
    with torch.no_grad():
        kw = {k: v for k, v in image_batch.items() if v is not None}
        silent_1d = qwen_hf(**kw).logits
        out = qwen_model(**image_batch)
    assert (out - silent_1d).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["one_image", "left_padded_batch"])
def test_residuals_and_patterns_match_hf(qwen_hf, qwen_model, case):
    batch = qwen_batch(CASES[case], seed=4)
    with torch.no_grad():
        ref = qwen_hf(**hf_kwargs(batch), output_hidden_states=True, output_attentions=True)
        _, cache = qwen_model.run_with_cache(**batch)
    real = real_tokens(batch)
    n = qwen_model.cfg.n_layers
    assert len(ref.hidden_states) == n + 1
    for l in range(n):
        ours = cache["resid_post", l]
        if l == n - 1:  # HF's last hidden state is taken after the final norm
            ours = qwen_model.ln_final(ours)
        d = (ours - ref.hidden_states[l + 1])[real].abs().max().item()
        assert d <= FP32_TOL, f"layer {l} resid_post diff {d:.3g}"
        pattern = cache["pattern", l]
        assert pattern.shape == ref.attentions[l].shape
        rows = real[:, None, :, None].expand_as(pattern)  # compare real query rows
        d = (pattern - ref.attentions[l])[rows].abs().max().item()
        assert d <= 1e-5, f"layer {l} pattern diff {d:.3g}"
    d = (cache["hook_embed"] - ref.hidden_states[0])[real].abs().max().item()
    assert d <= FP32_TOL


def test_sdpa_and_explicit_paths_agree(qwen_model):
    """The explicit softmax path (used when a pattern hook is attached) equals SDPA."""
    batch = qwen_batch(CASES["left_padded_batch"], seed=5)
    real = real_tokens(batch)
    with torch.no_grad():
        sdpa = qwen_model(**batch)
        explicit = qwen_model.run_with_hooks(
            **batch, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)])
    assert (sdpa - explicit)[real].abs().max() <= 1e-5


def test_tied_embeddings_and_sliding_window_config():
    hf = make_hf_qwen(seed=7, n_layers=2, tie=True, use_sliding_window=True, sliding_window=6,
                      max_window_layers=1)
    assert hf.config.text_config.layer_types == ["full_attention", "sliding_attention"]
    model = HookedVLM.from_hf(hf)
    assert model.cfg.tie_word_embeddings and model.unembed.weight is model.embed.W_E
    assert model.cfg.window(0) is None and model.cfg.window(1) == 6
    batch = qwen_batch([[3, (1, 4, 6), 8]], seed=7)
    with torch.no_grad():
        ref = hf(**hf_kwargs(batch)).logits
        out = model(**batch)
    assert (out - ref).abs().max() <= FP32_TOL


def test_bf16_matches_hf_bf16(qwen_hf, qwen_model):
    """bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%). mechvlm and HF run the
    same ops, but not always in the same order (RMSNorm divides by the scale where HF
    multiplies by rsqrt; GQA through SDPA's enable_gqa where HF repeats K/V under a
    mask), so single roundings differ and compound over layers. Tolerance: mechvlm's
    bf16 error against the fp32 reference must be no worse than 1.5x HF bf16's own error
    (+0.01), and the two bf16 runs must agree within 5% of the logit range."""
    batch = qwen_batch(CASES["left_padded_batch"], seed=8)
    real = real_tokens(batch)
    hf16 = copy.deepcopy(qwen_hf).to(torch.bfloat16)
    hf16.set_attn_implementation("sdpa")
    m16 = HookedVLM.from_hf(hf16)
    assert m16.dtype == torch.bfloat16
    with torch.no_grad():
        ref32 = qwen_hf(**hf_kwargs(batch)).logits[real]
        ref16 = hf16(**hf_kwargs(batch)).logits.float()[real]
        out16 = m16(**batch).float()[real]
    hf_err = (ref16 - ref32).abs().max().item()
    our_err = (out16 - ref32).abs().max().item()
    assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
    assert (out16 - ref16).abs().max().item() <= 0.05 * ref32.abs().max().item()


def test_from_hf_does_not_mutate_hf_model(qwen_hf):
    before = {k: v.clone() for k, v in qwen_hf.state_dict().items()}
    impl = qwen_hf.config._attn_implementation
    model = HookedVLM.from_hf(qwen_hf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # editing mechvlm's weights must not reach the HF model
    after = qwen_hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert qwen_hf.config._attn_implementation == impl
    assert all(p.requires_grad for p in qwen_hf.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_save_pretrained_round_trip(tmp_path, qwen_hf, image_batch):
    qwen_hf.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(str(tmp_path))
    hf_sdpa = copy.deepcopy(qwen_hf)
    hf_sdpa.set_attn_implementation("sdpa")  # from_pretrained's default for the vision tower
    direct = HookedVLM.from_hf(hf_sdpa)
    assert loaded.cfg == direct.cfg
    assert loaded.cfg.architecture == "Qwen2_5_VLForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(loaded(**image_batch), direct(**image_batch))
