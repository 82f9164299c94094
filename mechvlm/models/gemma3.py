"""Gemma3: config mapping, weight conversion, vision encoder, positions and image blocks.

The math (`transformers.models.gemma3`, 5.23; see shared UPSTREAM_NOTES) is the shared
block configured with Gemma options: RMSNorm ``(1 + w)`` in fp32, sandwich norms, per-head
``q_norm``/``k_norm`` before RoPE, scale ``query_pre_attn_scalar**-0.5``, no q/k/v bias,
GeLU-tanh gated MLP, embedding times ``sqrt(d_model)`` (cast to the weight dtype), tied
unembedding, and one 1-D RoPE per layer type (sliding layers: local base, unscaled; full
layers: global base with optional linear scaling).

What HF does and mechvlm matches (or deliberately does not):
    * Bidirectional image blocks. HF builds them only when ``token_type_ids`` is passed
      (otherwise it silently runs a purely causal mask). mechvlm always derives them from
      ``input_ids``: each maximal run of image soft tokens is ONE block, as HF's
      ``get_block_sequence_ids_for_mask`` groups runs. Two images written back to back
      without ``<eoi><boi>`` in between therefore share one block (HF merges them too);
      the processor's prompt format always separates images.
    * Layer rule: full ``causal OR same_block``; sliding ``(causal OR same_block) AND
      k > q - W``; then AND key padding. The window only bounds the past: an image query
      sees every future key of its own block even when the block is longer than ``W``.
    * Positions: HF's forward without ``position_ids`` uses ``arange`` including left
      pads; ``generate`` counts real tokens. mechvlm counts real tokens (pads get 0). With
      1-D RoPE a per-row shift cancels in ``q.k``, so the two agree up to rounding (about
      1e-5 in fp32 on the test models); the parity tests give HF the real-token positions.
    * ``attn_logit_softcapping`` is never applied by HF; ``final_logit_softcapping`` is
      applied by ``Gemma3ForCausalLM`` only, not by ``Gemma3ForConditionalGeneration``
      (the class mechvlm mirrors), so neither is applied here.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Int
from torch import Tensor, nn

from mechvlm.components import RMSNorm, RotaryEmbedding, TransformerBlock
from mechvlm.config import FULL_ATTENTION, SLIDING_ATTENTION, VLMConfig
from mechvlm.image_layout import ImageSpan, find_image_spans
from mechvlm.models.base import (
    ModelFamily,
    PreparedInputs,
    build_standard_block,
    check_input_ids,
    VisualInput,
    padding_from_attention_mask,
    real_token_positions,
    register_family,
    reject_unused,
)

_SUPPORTED_ROPE = ("default", "linear")


class Gemma3VisionEncoder(nn.Module):
    """HF's SigLIP tower and Gemma3 multimodal projector (frozen, reused as is).

    ``forward(pixel_values [n_images, 3, S, S], image_grid_thw=None)`` returns
    ``[n_images * mm_tokens_per_image, d_model]``, image after image, each image's tokens
    row-major over its ``sqrt(mm) x sqrt(mm)`` pooled grid.
    """

    def __init__(self, vision_tower: nn.Module, projector: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector

    def forward(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None) -> Tensor:
        if image_grid_thw is not None:
            raise ValueError("Gemma3 takes no image_grid_thw (every image is one fixed-size grid)")
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values=pixel_values.to(dtype), return_dict=True).last_hidden_state
        feats = self.multi_modal_projector(hidden)  # [n_images, mm_tokens, d_model]
        return feats.reshape(-1, feats.shape[-1])


def _rope_params(tc, layer_type: str) -> tuple[float, float]:
    """``(theta, linear factor)`` of one layer type from HF's per-type ``rope_parameters``."""
    params = dict((tc.rope_parameters or {}).get(layer_type) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        raise NotImplementedError(f"Gemma3 {layer_type} rope_type {rope_type!r} is not supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("Gemma3 with partial_rotary_factor != 1 is not supported")
    return float(params["rope_theta"]), float(params["factor"]) if rope_type == "linear" else 1.0


class Gemma3Family(ModelFamily):
    model_type = "gemma3"
    hf_class_name = "Gemma3ForConditionalGeneration"

    def config_from_hf(self, hf_config, *, dtype: torch.dtype, device: str) -> VLMConfig:
        tc = hf_config.text_config
        if getattr(tc, "use_bidirectional_attention", False):
            raise NotImplementedError("Gemma3 with use_bidirectional_attention=True is not supported")
        if tc.attention_bias:
            raise NotImplementedError("Gemma3 with attention_bias=True is not supported")
        global_theta, global_factor = _rope_params(tc, FULL_ATTENTION)
        local_theta, local_factor = _rope_params(tc, SLIDING_ATTENTION)
        if local_factor != 1.0:
            raise NotImplementedError("Gemma3 with a scaled RoPE on sliding layers is not supported")
        mm = int(hf_config.mm_tokens_per_image)
        if math.isqrt(mm) ** 2 != mm:
            raise ValueError(f"mm_tokens_per_image={mm} is not a square")
        global_type = tc.rope_parameters[FULL_ATTENTION].get("rope_type", "default")
        return VLMConfig(
            architecture=self.hf_class_name,
            model_type=self.model_type,
            n_layers=tc.num_hidden_layers,
            d_model=tc.hidden_size,
            n_heads=tc.num_attention_heads,
            n_kv_heads=tc.num_key_value_heads,
            d_head=tc.head_dim,
            d_mlp=tc.intermediate_size,
            d_vocab=tc.vocab_size,
            eps=tc.rms_norm_eps,
            act_fn=tc.hidden_activation,
            attn_scale=float(tc.query_pre_attn_scalar) ** -0.5,
            rope_theta=global_theta,
            rope_type=global_type,
            rope_scaling_factor=global_factor,
            rope_local_theta=local_theta,
            layer_types=tuple(tc.layer_types),
            sliding_window=tc.sliding_window if SLIDING_ATTENTION in tc.layer_types else None,
            image_token_id=hf_config.image_token_id,
            image_start_token_id=hf_config.boi_token_id,
            image_end_token_id=hf_config.eoi_token_id,
            bos_token_id=tc.bos_token_id,
            eos_token_id=tc.eos_token_id,
            pad_token_id=tc.pad_token_id,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            n_ctx=getattr(tc, "max_position_embeddings", None),
            dtype=dtype,
            device=str(device),
            extra={"mm_tokens_per_image": mm, "image_size": int(hf_config.vision_config.image_size),
                   "final_logit_softcapping_not_applied": tc.final_logit_softcapping},
        )

    def build_block(self, cfg: VLMConfig, layer: int) -> TransformerBlock:
        return build_standard_block(cfg, layer, qkv_bias=False, qk_norm=True, sandwich=True,
                                    offset_weight=True)

    def build_final_norm(self, cfg: VLMConfig) -> RMSNorm:
        return RMSNorm(cfg.d_model, cfg.eps, offset_weight=True)

    def embed_scale(self, cfg: VLMConfig) -> float:
        return cfg.d_model**0.5

    def rotary(self, cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
        tables = {FULL_ATTENTION: RotaryEmbedding(cfg.d_head, cfg.rope_theta, cfg.rope_scaling_factor),
                  SLIDING_ATTENTION: RotaryEmbedding(cfg.d_head, cfg.rope_local_theta)}
        return {t: tables[t] for t in set(cfg.layer_types)}

    def state_dict_from_hf(self, hf_model: nn.Module) -> dict[str, Tensor]:
        lm = hf_model.model.language_model
        sd = {"embed.W_E": lm.embed_tokens.weight, "ln_final.w": lm.norm.weight,
              "unembed.weight": hf_model.lm_head.weight}
        norms = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                 "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
        for l, layer in enumerate(lm.layers):
            p = f"blocks.{l}."
            for ours, theirs in norms.items():
                sd[f"{p}{ours}.w"] = getattr(layer, theirs).weight
            attn = layer.self_attn
            sd[p + "attn.q_norm.w"] = attn.q_norm.weight
            sd[p + "attn.k_norm.w"] = attn.k_norm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[f"{p}attn.{name}.weight"] = getattr(attn, name).weight
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{p}mlp.{name}.weight"] = getattr(layer.mlp, name).weight
        return sd

    def state_dict_to_hf(self, weights: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
        lm = "model.language_model."
        out = {lm + "embed_tokens.weight": weights["embed.W_E"], lm + "norm.weight": weights["ln_final.w"],
               "lm_head.weight": weights.get("unembed.weight", weights["embed.W_E"])}
        norms = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                 "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
        for l in range(cfg.n_layers):
            p, q = f"blocks.{l}.", f"{lm}layers.{l}."
            for ours, theirs in norms.items():
                out[f"{q}{theirs}.weight"] = weights[f"{p}{ours}.w"]
            out[q + "self_attn.q_norm.weight"] = weights[p + "attn.q_norm.w"]
            out[q + "self_attn.k_norm.weight"] = weights[p + "attn.k_norm.w"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{q}self_attn.{name}.weight"] = weights[f"{p}attn.{name}.weight"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{q}mlp.{name}.weight"] = weights[f"{p}mlp.{name}.weight"]
        return out

    vision_prefixes = {"vision.vision_tower.": "model.vision_tower.",
                       "vision.multi_modal_projector.": "model.multi_modal_projector."}

    def vision_encoder(self, hf_model: nn.Module) -> nn.Module:
        return Gemma3VisionEncoder(hf_model.model.vision_tower, hf_model.model.multi_modal_projector)

    # --- inputs ----------------------------------------------------------------------
    def prepare_inputs(self, cfg, input_ids, pixel_values, image_grid_thw, attention_mask, device,
                       token_type_ids=None, image_cells=None, **visual):
        """See `ModelFamily.prepare_inputs`. With ``image_cells`` (images with removed
        tokens), positions are what Gemma3 gives the shorter sequence: 1-D, counting the
        real tokens that are left (the text after a pruned image moves up), and each
        image's kept tokens form its bidirectional block."""
        reject_unused(visual, "Gemma3")
        check_input_ids(input_ids)
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is not used by Gemma3 (every image is "
                             f"{cfg.extra['mm_tokens_per_image']} tokens); drop it")
        input_ids = input_ids.to(device)
        key_padding = padding_from_attention_mask(attention_mask, input_ids, device)
        is_image = input_ids == cfg.image_token_id
        block_ids = image_block_ids(is_image)
        if token_type_ids is not None:
            check_token_type_ids(token_type_ids, is_image, cfg.image_token_id)
        spans = self._spans(cfg, input_ids, is_image, block_ids, pixel_values, key_padding, image_cells)
        visual = [VisualInput("image", cfg.image_token_id, {"pixel_values": pixel_values},
                              sum(s.n_cells for s in spans))] if spans else []
        return PreparedInputs(input_ids, key_padding, spans, gemma3_position_ids(key_padding, input_ids.shape)
                              .to(device), block_ids if spans else None, visual=visual)

    def image_spans(self, cfg, input_ids, image_grid_thw, key_padding, image_cells=None, **visual) -> list[ImageSpan]:
        reject_unused(visual, "Gemma3")
        mm, tok = cfg.extra["mm_tokens_per_image"], cfg.image_token_id
        side = math.isqrt(mm)
        if image_cells is not None:
            return find_image_spans(input_ids, tok, [(1, side, side)] * len(image_cells), key_padding,
                                    cells=image_cells)
        block_ids = image_block_ids(input_ids == tok)
        for row, start, stop in _runs(block_ids):
            if (stop - start) % mm:
                raise ValueError(
                    f"the run of {stop - start} image tokens (id {tok}) at row {row}, positions "
                    f"{start}..{stop - 1} is not a whole number of images of mm_tokens_per_image={mm} tokens")
        n_images = int((input_ids == tok).sum()) // mm
        return find_image_spans(input_ids, tok, [(1, side, side)] * n_images, key_padding)

    def _spans(self, cfg, input_ids, is_image, block_ids, pixel_values, key_padding,
               image_cells=None) -> list[ImageSpan]:
        mm, tok = cfg.extra["mm_tokens_per_image"], cfg.image_token_id
        n_tokens = int(is_image.sum())
        n_blocks = int((block_ids.max(dim=-1).values + 1).sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids contain {n_tokens} image tokens (id {tok}) in {n_blocks} "
                                 "block(s) but pixel_values is None: pass the images")
            return []
        size = cfg.extra["image_size"]
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [n_images, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        if image_cells is not None and len(image_cells) != pixel_values.shape[0]:
            raise ValueError(f"image_cells has {len(image_cells)} entries but pixel_values holds "
                             f"{pixel_values.shape[0]} image(s)")
        spans = self.image_spans(cfg, input_ids, None, key_padding, image_cells)
        if len(spans) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} image(s) but input_ids hold {n_tokens} image tokens "
                f"(id {tok}) = {len(spans)} image(s) of {mm} tokens in {n_blocks} block(s)")
        return spans


def image_block_ids(is_image: Tensor) -> Int[Tensor, "batch pos"]:
    """HF's ``get_block_sequence_ids_for_mask``: each maximal run of image tokens in a row
    gets the next id (0, 1, ... per row); every other token -1."""
    prev = nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    group = torch.cumsum((is_image & ~prev).int(), dim=1) - 1
    return torch.where(is_image, group, -1).long()


def _runs(block_ids: Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` of every block."""
    out = []
    for row, ids in enumerate(block_ids.cpu().tolist()):
        for b in range(max(ids) + 1):
            pos = [i for i, v in enumerate(ids) if v == b]
            out.append((row, pos[0], pos[-1] + 1))
    return out


def check_token_type_ids(token_type_ids: Tensor, is_image: Tensor, image_token_id: int) -> None:
    """Raise unless ``token_type_ids`` is 1 exactly on the image tokens (0 elsewhere)."""
    if not isinstance(token_type_ids, Tensor) or token_type_ids.shape != is_image.shape:
        shape = tuple(token_type_ids.shape) if isinstance(token_type_ids, Tensor) else type(token_type_ids)
        raise ValueError(f"token_type_ids must be [batch, pos] like input_ids {tuple(is_image.shape)}, got {shape}")
    bad = (token_type_ids.to(is_image.device) != is_image.long()).nonzero()
    if len(bad):
        row, pos = bad[0].tolist()
        raise ValueError(
            f"token_type_ids disagree with input_ids at {len(bad)} position(s), first (row {row}, pos {pos}): "
            f"token_type_ids must be 1 exactly on the image tokens (id {image_token_id}), which mechvlm "
            "uses to build the bidirectional image blocks")


gemma3_position_ids = real_token_positions  # 1-D positions counting real tokens only (left pads get 0)


GEMMA3 = register_family(Gemma3Family())
