"""The plain HF decoder LMs that LLaVA-style VLMs wrap (Llama / Vicuna, Qwen2), mapped onto
the shared pre-norm block with 1-D RoPE.

What HF does (transformers 5.23, ``models/llama``, ``models/qwen2``) and mechvlm matches:
    * RMSNorm ``w * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`` (as Qwen2.5-VL);
      pre-norm blocks; SiLU-gated MLP without bias; GQA; scale ``head_dim**-0.5``.
    * Llama: ``head_dim`` from the config when set (else ``hidden / heads``); q/k/v/o
      carry a bias only with ``attention_bias`` (then o_proj too, which mechvlm's
      attention does not hold: rejected, as is ``mlp_bias``; no LLaVA checkpoint uses them).
    * Qwen2: q/k/v with bias, o_proj without; optional sliding-window layers
      (``layer_types``; a key is visible iff ``k > q - sliding_window``).
    * RoPE: the inverse frequencies come from HF's own ``ROPE_INIT_FUNCTIONS`` for
      ``linear`` and ``llama3`` (Llama 3.1's frequency-dependent scaling); ``default`` is
      ``theta^(-2i/d)``. ``dynamic`` / ``yarn`` / ``longrope`` (sequence-length dependent
      or with an attention factor) and ``partial_rotary_factor != 1`` are rejected.
"""

from __future__ import annotations

import torch

from mechvlm.components import RotaryEmbedding
from mechvlm.config import VLMConfig

SUPPORTED_TEXT_MODELS = ("llama", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")


def rope_inv_freq(tc) -> tuple[str, float, torch.Tensor | None]:
    """``(rope_type, theta, inv_freq)``; ``inv_freq`` is HF's for a scaled type, None for default."""
    params = dict(tc.rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"{tc.model_type} rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE})")
    if params.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0)) not in (None, 1.0):
        raise NotImplementedError(f"{tc.model_type} with partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return rope_type, float(params["rope_theta"]), None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](tc, "cpu")
    if attention_scaling != 1.0:  # pragma: no cover - linear / llama3 have none
        raise NotImplementedError(f"rope_type {rope_type!r} with attention scaling {attention_scaling}")
    return rope_type, float(params["rope_theta"]), inv_freq.float()


def decoder_fields(tc) -> dict:
    """The `VLMConfig` fields of a Llama / Qwen2 text config (``extra`` included)."""
    mt = tc.model_type
    if mt not in SUPPORTED_TEXT_MODELS:
        raise NotImplementedError(f"mechvlm has no mapping for the text model {mt!r}; supported: "
                                  f"{SUPPORTED_TEXT_MODELS}")
    if mt == "llama":
        if tc.attention_bias:
            raise NotImplementedError("Llama with attention_bias=True (an o_proj bias) is not supported")
        if tc.mlp_bias:
            raise NotImplementedError("Llama with mlp_bias=True is not supported")
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope_type, theta, inv_freq = rope_inv_freq(tc)
    layer_types = tuple(getattr(tc, "layer_types", None) or ())
    sliding = "sliding_attention" in layer_types
    return dict(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
        n_kv_heads=tc.num_key_value_heads, d_head=d_head, d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size,
        eps=tc.rms_norm_eps, act_fn=tc.hidden_act, attn_scale=d_head**-0.5, rope_theta=theta,
        rope_type=rope_type, layer_types=layer_types, sliding_window=tc.sliding_window if sliding else None,
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
        n_ctx=getattr(tc, "max_position_embeddings", None),
        extra={"text_model_type": mt, "qkv_bias": mt == "qwen2",
               "rope_inv_freq": tuple(inv_freq.tolist()) if inv_freq is not None else None},
    )


def decoder_rotary(cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
    """One 1-D RoPE table shared by every layer type."""
    inv = cfg.extra.get("rope_inv_freq")
    table = RotaryEmbedding(cfg.d_head, cfg.rope_theta,
                            inv_freq=torch.tensor(inv, dtype=torch.float32, device="cpu") if inv is not None else None)
    return {t: table for t in set(cfg.layer_types)}
