"""HookedVLM(Gemma3) against Hugging Face's own Gemma3ForConditionalGeneration.

HF is the independent reference: eager attention, ``token_type_ids`` passed (without them
HF silently drops the bidirectional image blocks), and under left padding the real-token
``position_ids`` (HF's forward would otherwise count pads). Nothing here asks mechvlm to
compute a reference.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from mechvlm import HookedVLM
from mechvlm.synthetic import GEMMA3_IDS, gemma3_config, gemma3_pixel_values, gemma3_prompt, left_pad

torch.set_num_threads(min(2, torch.get_num_threads()))
FP32_TOL = 1e-4
IMG, BOI, EOI = GEMMA3_IDS["image"], GEMMA3_IDS["boi"], GEMMA3_IDS["eoi"]
S, F = "sliding_attention", "full_attention"


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Re-draw every weight with a larger spread than HF's init. Gemma norms multiply by
    ``1 + w`` (HF inits w = 0), so norm weights get a spread of 0.3 around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and p.ndim == 1:
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(std * noise)
    return model


def make_hf(seed: int = 0, **config_kw) -> nn.Module:
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = gemma3_config(**config_kw)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    return randomize_(model, seed)


def batch_from(rows: list[list], mm: int, seed: int = 0, back_to_back: bool = False) -> dict:
    """HookedVLM inputs from prompt segments per row (see ``gemma3_prompt``); several rows
    are left-padded. ``back_to_back`` drops every ``<eoi> <boi>`` pair between images."""
    g = torch.Generator().manual_seed(seed)
    ids = [gemma3_prompt(segs, mm_tokens=mm, generator=g)[0] for segs in rows]
    if back_to_back:
        ids = [torch.tensor(_drop_eoi_boi(r.tolist())) for r in ids]
    input_ids, mask = (ids[0][None], None) if len(ids) == 1 else left_pad(ids, GEMMA3_IDS["pad"])
    n_images = sum(seg == "image" for segs in rows for seg in segs)
    pv = gemma3_pixel_values(n_images, generator=g) if n_images else None
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pv}


def _drop_eoi_boi(t: list[int]) -> list[int]:
    out = []
    for tok in t:
        if tok == BOI and out and out[-1] == EOI:
            out.pop()
        else:
            out.append(tok)
    return out


def hf_kwargs(batch: dict) -> dict:
    kw = {k: v for k, v in batch.items() if v is not None}
    kw["token_type_ids"] = (batch["input_ids"] == IMG).long()
    kw["use_cache"] = False
    if batch["attention_mask"] is not None:  # count real tokens, as generate() does
        kw["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return kw


def real_tokens(batch: dict) -> torch.Tensor:
    am = batch["attention_mask"]
    return am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


@pytest.fixture(scope="module")
def hf():  # layers S S F S S F, window 6, 4 tokens per image
    return make_hf(seed=0)


@pytest.fixture(scope="module")
def model(hf):
    return HookedVLM.from_hf(hf)


@pytest.fixture(scope="module")
def hf_short():  # window 4 < the 16-token image block; layers S F S F
    return make_hf(seed=1, mm_tokens=16, sliding_window=4, n_layers=4, layer_types=[S, F, S, F])


@pytest.fixture(scope="module")
def model_short(hf_short):
    return HookedVLM.from_hf(hf_short)


CASES = {
    "text_only": ([[14]], {}),
    "one_image": ([[3, "image", 7]], {}),
    "two_images_one_row": ([[3, "image", 4, "image", 5]], {}),
    "left_padded_batch": ([[3, "image", 5], [2, "image", 1, "image", 3]], {}),
    "padded_batch_text_row": ([[3, "image", 5], [6]], {}),
    "back_to_back_images": ([[3, "image", "image", 5]], {"back_to_back": True}),
}


def _compare(hf_model, model, batch, check_internals: bool):
    with torch.no_grad():
        ref = hf_model(**hf_kwargs(batch), output_hidden_states=check_internals, output_attentions=check_internals)
        out = model(**batch)
    real = real_tokens(batch)
    assert out.shape == ref.logits.shape and ref.logits[real].abs().max() > 1.0
    diffs = {"logits": (out - ref.logits)[real].abs().max().item()}
    if check_internals:
        with torch.no_grad():
            cache_logits, cache = model.run_with_cache(**batch)
        diffs["logits_explicit_path"] = (cache_logits - ref.logits)[real].abs().max().item()
        n = model.cfg.n_layers
        assert len(ref.hidden_states) == n + 1 and len(ref.attentions) == n
        diffs["embed"] = (cache["hook_embed"] - ref.hidden_states[0])[real].abs().max().item()
        for l in range(n):
            ours = cache["resid_post", l]
            if l == n - 1:  # HF's last hidden state is after the final norm
                ours = model.ln_final(ours)
            diffs[f"resid_post.{l}"] = (ours - ref.hidden_states[l + 1])[real].abs().max().item()
            rows = real[:, None, :, None].expand_as(ref.attentions[l])  # real query rows only
            diffs[f"pattern.{l}"] = (cache["pattern", l] - ref.attentions[l])[rows].abs().max().item()
    return diffs


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_eager(hf, model, case):
    rows, kw = CASES[case]
    batch = batch_from(rows, mm=4, seed=3, **kw)
    diffs = _compare(hf, model, batch, check_internals=case in ("two_images_one_row", "left_padded_batch"))
    print(f"\n[gemma3 fp32 {case}] max abs diffs: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= FP32_TOL, diffs


@pytest.mark.parametrize("rows", [[[3, "image", 6]], [[2, "image", 3, "image", 2], [5, "image", 1]]])
def test_window_shorter_than_image_block(hf_short, model_short, rows):
    batch = batch_from(rows, mm=16, seed=4)
    assert model_short.cfg.window(0) == 4 < 16
    diffs = _compare(hf_short, model_short, batch, check_internals=True)
    print(f"\n[gemma3 fp32 short window {len(rows)} rows] max abs diffs: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= FP32_TOL, diffs


def test_out_of_vocab_image_token_matches_hf():
    """HF embeds an image placeholder id >= vocab_size as id 0 before the scatter."""
    ids = dict(GEMMA3_IDS, image=300)  # == vocab_size
    hf_oov = make_hf(seed=2, n_layers=3, layer_types=[S, F, S], ids=ids)
    input_ids = gemma3_prompt([2, "image", 3], ids=ids, generator=torch.Generator().manual_seed(0))
    pv = gemma3_pixel_values(1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_oov(input_ids=input_ids, pixel_values=pv, token_type_ids=(input_ids == 300).long(),
                     use_cache=False).logits
        assert (HookedVLM.from_hf(hf_oov)(input_ids, pv) - ref).abs().max() <= FP32_TOL


def test_hf_without_token_type_ids_differs(hf, model):
    """The HF trap: without token_type_ids HF silently runs a causal mask over images."""
    batch = batch_from(*CASES["one_image"][:1], mm=4, seed=3)
    with torch.no_grad():
        kw = hf_kwargs(batch)
        kw.pop("token_type_ids")
        assert (model(**batch) - hf(**kw).logits).abs().max() > 1e-2


def test_config_records_gemma3_layout(hf, model):
    cfg, tc = model.cfg, hf.config.text_config
    assert cfg.layer_types == tuple(tc.layer_types) == (S, S, F, S, S, F)
    assert [cfg.window(l) for l in range(6)] == [6, 6, None, 6, 6, None]
    assert (cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id) == (BOI, IMG, EOI)
    assert cfg.d_head == 16 and cfg.attn_scale == 16**-0.5 and cfg.rope_scaling_factor == 8.0
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    for name in ("blocks.0.attn.q_norm.hook_scale", "blocks.0.attn.k_norm.hook_normalized",
                 "blocks.2.ln1_post.hook_scale", "blocks.2.ln2_post.hook_scale", "hook_image_embeds"):
        assert name in model.hook_dict
    assert model.unembed.weight is model.embed.W_E


def test_gemma3_4b_shaped_config_maps():
    from mechvlm.models.gemma3 import GEMMA3
    from mechvlm.synthetic import gemma3_4b_text_config

    cfg = GEMMA3.config_from_hf(gemma3_4b_text_config(n_layers=6), dtype=torch.bfloat16, device="cpu")
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (
        2560, 8, 4, 256, 10240, 262208)
    assert cfg.layer_types == (S,) * 5 + (F,) and cfg.sliding_window == 1024
    assert (cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id) == (255999, 262144, 256000)
    assert cfg.extra["mm_tokens_per_image"] == 256 and cfg.attn_scale == 256**-0.5


def test_pattern_block_window_structure(model_short):
    """An image query sees future keys of its own block (even past the window), nothing
    after its block, and in a sliding layer nothing at or before q - W."""
    batch = batch_from([[5, "image", 3]], mm=16, seed=5)
    with torch.no_grad():
        _, cache = model_short.run_with_cache(**batch, names_filter=lambda n: n.endswith("hook_pattern"))
    start = 1 + 5 + 1  # bos, text, boi
    stop = start + 16
    for l, window in ((0, 4), (1, None)):
        pat = cache["pattern", l][0]  # [head, q, k]
        seq = pat.shape[-1]
        for q in (start, start + 5, stop - 1):
            k = torch.arange(seq)
            allowed = ((k <= q) | ((k >= start) & (k < stop)))
            if window is not None:
                allowed &= k > q - window
            row = pat[:, q]
            assert (row[:, ~allowed] == 0).all()
            assert (row[:, (k > q) & (k < stop)] > 0).all()  # future image keys of its block
            assert (row[:, allowed] > 0).all()
        if window is not None:  # the block's first query sees all 15 future keys, far past W
            assert (pat[:, start, start + 4:stop] > 0).all()


def hf_with_pattern_edit(hf_model: nn.Module, layer: int, pattern_fn) -> nn.Module:
    """A deepcopy of ``hf_model`` whose eager attention in ``layer`` applies ``pattern_fn``
    to the softmax output ``[batch, head, q, k]``: HF's eager attention, op for op,
    registered through HF's AttentionInterface together with HF's eager mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gemma3 import modeling_gemma3 as mg

    ref = copy.deepcopy(hf_model)
    target = ref.model.language_model.layers[layer].self_attn

    def edited_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        if module is not target:
            return mg.eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling,
                                              softcap, **kw)
        key = mg.repeat_kv(key, module.num_key_value_groups)
        value = mg.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = pattern_fn(nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype))
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    AttentionInterface.register("mechvlm_gemma3_edit", edited_eager)
    AttentionMaskInterface.register("mechvlm_gemma3_edit", eager_mask)
    ref.set_attn_implementation({"text_config": "mechvlm_gemma3_edit"})  # SigLIP stays eager
    assert ref.config.text_config._attn_implementation == "mechvlm_gemma3_edit"
    assert ref.config.vision_config._attn_implementation == "eager"
    return ref


def _edit(p: torch.Tensor) -> torch.Tensor:
    p = p.clone()
    p[..., 0] = 0.0  # no attention to BOS
    p[:, 1] = p[:, 1] * 1.5
    return p


@pytest.mark.parametrize("layer", [1, 2], ids=["sliding", "full"])
def test_pattern_edit_matches_hf(hf, model, layer):
    assert model.cfg.layer_types[layer] == (S if layer == 1 else F)
    batch = batch_from(*CASES["two_images_one_row"][:1], mm=4, seed=6)
    ref_model = hf_with_pattern_edit(hf, layer, _edit)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(batch)).logits
        clean = model(**batch)
        out = model.run_with_hooks(**batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern",
                                                        lambda p, hook: _edit(p))])
    assert (out - clean).abs().max() > 1e-2  # the edit takes effect
    diff = (out - ref).abs().max().item()
    print(f"\n[gemma3 fp32 pattern edit layer {layer}] max abs diff {diff:.2e}")
    assert diff <= FP32_TOL


def test_bf16_error_no_worse_than_hf(hf):
    """Against the fp32 HF reference, mechvlm in bf16 (SDPA path) errs at most ~2x as much
    as HF's own eager bf16 (max and mean abs over logits), plus a 0.05 slack on the max."""
    batch = batch_from(*CASES["left_padded_batch"][:1], mm=4, seed=7)
    real = real_tokens(batch)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    m16 = HookedVLM.from_hf(hf, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = hf(**hf_kwargs(batch)).logits[real]
        kw16 = hf_kwargs(batch)
        kw16["pixel_values"] = kw16["pixel_values"].bfloat16()
        theirs = hf16(**kw16).logits.float()[real]
        ours = m16(**batch).float()[real]
        ours_explicit = m16.run_with_cache(**batch, names_filter="blocks.0.attn.hook_pattern")[0].float()[real]
    e_hf, e_ours = (theirs - ref).abs(), (ours - ref).abs()
    e_expl, e_vs_hf = (ours_explicit - ref).abs(), (ours - theirs).abs()
    print(f"\n[gemma3 bf16] vs fp32 ref: HF bf16 max {e_hf.max():.3f} mean {e_hf.mean():.4f}; mechvlm bf16 "
          f"max {e_ours.max():.3f} mean {e_ours.mean():.4f} (explicit path max {e_expl.max():.3f}); "
          f"mechvlm vs HF bf16 max {e_vs_hf.max():.3f} mean {e_vs_hf.mean():.4f}; |ref| max {ref.abs().max():.1f}")
    for e in (e_ours, e_expl):
        assert e.max() <= 2 * e_hf.max() + 0.05
        assert e.mean() <= 2 * e_hf.mean()


def test_embed_scale_rounds_like_hf_in_bf16():
    """sqrt(2560) = 50.596 becomes 50.5 in bf16, in HF and in mechvlm."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from mechvlm.components import Embed

    theirs = Gemma3TextScaledWordEmbedding(8, 2560, 0, embed_scale=2560**0.5).to(torch.bfloat16)
    ours = Embed(8, 2560, scale=2560**0.5)
    ours.W_E = nn.Parameter(theirs.weight.detach().clone())
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids))
        assert torch.equal(ours(ids), theirs.weight[ids] * 50.5)


def test_save_pretrained_round_trip(hf, model, tmp_path):
    """Identical logits after a local round trip. The SigLIP tower is HF's module, so it
    keeps HF's attention implementation: ``from_pretrained`` defaults to sdpa there (the
    fixture's is eager), which moves logits by ~1e-5; asking for eager gives bit equality."""
    hf.save_pretrained(tmp_path)
    batch = batch_from(*CASES["left_padded_batch"][:1], mm=4, seed=8)
    loaded = HookedVLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    default = HookedVLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**batch), model(**batch))
        assert (default(**batch) - model(**batch)).abs().max() <= FP32_TOL


def test_token_type_ids_checked(model):
    batch = batch_from([[3, "image", 4]], mm=4, seed=9)
    tt = (batch["input_ids"] == IMG).long()
    with torch.no_grad():
        assert torch.equal(model(**batch, token_type_ids=tt), model(**batch))
        bad = tt.clone()
        bad[0, 5] = 0  # an image token marked as text
        with pytest.raises(ValueError, match="token_type_ids disagree"):
            model(**batch, token_type_ids=bad)
        bad = tt.clone()
        bad[0, 4] = 1  # <boi> marked as image
        with pytest.raises(ValueError, match="token_type_ids disagree"):
            model(**batch, token_type_ids=bad)


def test_bad_image_inputs_raise(model):
    ok = batch_from([[3, "image", 2, "image", 4]], mm=4, seed=10)
    ids, pv = ok["input_ids"], ok["pixel_values"]
    with pytest.raises(ValueError, match="pixel_values holds 1 image"):
        model(ids, pv[:1])
    with pytest.raises(ValueError, match="pixel_values is None"):
        model(ids)
    short = torch.cat([ids[0, :6], ids[0, 7:]])[None]  # the first image loses one soft token
    with pytest.raises(ValueError, match="not a whole number of images"):
        model(short, pv)
    with pytest.raises(ValueError, match="image_grid_thw is not used by Gemma3"):
        model(ids, pv, torch.tensor([[1, 2, 2], [1, 2, 2]]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[n_images, 3, 28, 28\]"):
        model(ids, pv[:, :, :14])
    text = batch_from([[6]], mm=4, seed=11)["input_ids"]
    with pytest.raises(ValueError, match="input_ids hold 0 image tokens"):
        model(text, pv)


def test_qwen_rejects_token_type_ids():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm.synthetic import qwen2_5_vl_config

    qwen = HookedVLM.from_hf(Qwen2_5_VLForConditionalGeneration._from_config(qwen2_5_vl_config(n_layers=1)))
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="token_type_ids is not used by Qwen2.5-VL"):
        qwen(ids, token_type_ids=torch.zeros_like(ids))
