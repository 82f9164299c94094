"""Qwen2.5-VL: config mapping, weight conversion, vision encoder and mRoPE positions.

The math of the backbone (`transformers.models.qwen2_5_vl`, see shared UPSTREAM_NOTES):
pre-norm blocks, RMSNorm cast back before the weight, q/k/v with bias, GQA, SiLU-gated
MLP, multimodal RoPE over (t, h, w) position rows. Positions are built here from
``input_ids`` and ``image_grid_thw``; unlike HF, there is no silent 1-D fallback when
``mm_token_type_ids`` is absent.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor, nn

from mechvlm.components import RotaryEmbedding, TransformerBlock
from mechvlm.config import VLMConfig
from mechvlm.image_layout import ImageSpan, find_image_spans
from mechvlm.models.base import (
    ModelFamily,
    PreparedInputs,
    build_standard_block,
    check_input_ids,
    padding_from_attention_mask,
    register_family,
)

_SUPPORTED_ROPE = ("default",)


class QwenVisionEncoder(nn.Module):
    """The HF Qwen2.5-VL vision tower with its patch merger (frozen, reused as is).

    ``forward(pixel_values [sum t*h*w patches, 3*tp*p*p], image_grid_thw [n_images, 3])``
    returns the merged features ``[n_image_tokens, d_model]`` in image order.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.type(dtype), grid_thw=image_grid_thw)
        return out.pooler_output


class Qwen2_5_VLFamily(ModelFamily):
    model_type = "qwen2_5_vl"
    hf_class_name = "Qwen2_5_VLForConditionalGeneration"

    def config_from_hf(self, hf_config, *, dtype: torch.dtype, device: str) -> VLMConfig:
        tc = hf_config.text_config
        rope = dict(tc.rope_parameters or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE:
            raise NotImplementedError(f"Qwen2.5-VL rope_type {rope_type!r} is not supported")
        d_head = tc.hidden_size // tc.num_attention_heads  # HF ignores a head_dim key here
        return VLMConfig(
            architecture=self.hf_class_name,
            model_type=self.model_type,
            n_layers=tc.num_hidden_layers,
            d_model=tc.hidden_size,
            n_heads=tc.num_attention_heads,
            n_kv_heads=tc.num_key_value_heads,
            d_head=d_head,
            d_mlp=tc.intermediate_size,
            d_vocab=tc.vocab_size,
            eps=tc.rms_norm_eps,
            act_fn=tc.hidden_act,
            attn_scale=d_head**-0.5,
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope_type,
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            layer_types=tuple(tc.layer_types),
            sliding_window=tc.sliding_window,
            image_token_id=hf_config.image_token_id,
            image_start_token_id=hf_config.vision_start_token_id,
            image_end_token_id=hf_config.vision_end_token_id,
            video_token_id=hf_config.video_token_id,
            bos_token_id=tc.bos_token_id,
            eos_token_id=tc.eos_token_id,
            pad_token_id=tc.pad_token_id,
            spatial_merge_size=hf_config.vision_config.spatial_merge_size,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            n_ctx=getattr(tc, "max_position_embeddings", None),
            dtype=dtype,
            device=str(device),
        )

    def build_block(self, cfg: VLMConfig, layer: int) -> TransformerBlock:
        return build_standard_block(cfg, layer, qkv_bias=True)

    def rotary(self, cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
        table = RotaryEmbedding(cfg.d_head, cfg.rope_theta, mrope_section=cfg.mrope_section)
        return {t: table for t in set(cfg.layer_types)}

    def state_dict_from_hf(self, hf_model: nn.Module) -> dict[str, Tensor]:
        lm = hf_model.model.language_model
        sd = {"embed.W_E": lm.embed_tokens.weight, "ln_final.w": lm.norm.weight,
              "unembed.weight": hf_model.lm_head.weight}
        for l, layer in enumerate(lm.layers):
            p = f"blocks.{l}."
            sd[p + "ln1.w"] = layer.input_layernorm.weight
            sd[p + "ln2.w"] = layer.post_attention_layernorm.weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for key, t in getattr(layer.self_attn, name).state_dict(keep_vars=True).items():
                    sd[f"{p}attn.{name}.{key}"] = t
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{p}mlp.{name}.weight"] = getattr(layer.mlp, name).weight
        return sd

    def state_dict_to_hf(self, weights: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
        lm = "model.language_model."
        out = {lm + "embed_tokens.weight": weights["embed.W_E"], lm + "norm.weight": weights["ln_final.w"],
               "lm_head.weight": weights.get("unembed.weight", weights["embed.W_E"])}
        for l in range(cfg.n_layers):
            p, q = f"blocks.{l}.", f"{lm}layers.{l}."
            out[q + "input_layernorm.weight"] = weights[p + "ln1.w"]
            out[q + "post_attention_layernorm.weight"] = weights[p + "ln2.w"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for key in ("weight", "bias"):
                    if f"{p}attn.{name}.{key}" in weights:
                        out[f"{q}self_attn.{name}.{key}"] = weights[f"{p}attn.{name}.{key}"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{q}mlp.{name}.weight"] = weights[f"{p}mlp.{name}.weight"]
        return out

    vision_prefixes = {"vision.visual.": "model.visual."}

    def vision_encoder(self, hf_model: nn.Module) -> nn.Module:
        return QwenVisionEncoder(hf_model.model.visual)

    # --- inputs ----------------------------------------------------------------------
    def merged_grids(self, cfg: VLMConfig, image_grid_thw: Tensor) -> list[tuple[int, int, int]]:
        m = cfg.spatial_merge_size
        if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be [n_images, 3], got {tuple(image_grid_thw.shape)}")
        grids = []
        for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
            if h % m or w % m:
                raise ValueError(f"image {i}: grid (t={t}, h={h}, w={w}) is not divisible by the merge size {m}")
            grids.append((t, h // m, w // m))
        return grids

    def image_spans(self, cfg, input_ids, image_grid_thw, key_padding, image_cells=None) -> list[ImageSpan]:
        if image_grid_thw is None:
            n_image_tokens = int((input_ids == cfg.image_token_id).sum())
            if n_image_tokens:
                raise ValueError(
                    f"input_ids contain {n_image_tokens} image tokens (id {cfg.image_token_id}) but "
                    "image_grid_thw is None: pass the image_grid_thw (and pixel_values) of the images"
                )
            return []
        return find_image_spans(input_ids, cfg.image_token_id, self.merged_grids(cfg, image_grid_thw), key_padding,
                                image_cells)

    def prepare_inputs(self, cfg, input_ids, pixel_values, image_grid_thw, attention_mask, device,
                       token_type_ids=None, image_cells=None):
        """See `ModelFamily.prepare_inputs`. With ``image_cells``, each kept image token keeps
        the mRoPE position of its grid cell and the text after the image keeps its positions
        (the grid still advances the position by ``max(h, w)``): removing a token changes
        nothing else, as masking it as a key would."""
        if token_type_ids is not None:
            raise ValueError("token_type_ids is not used by Qwen2.5-VL (it is a Gemma3 input); drop it")
        check_input_ids(input_ids)
        input_ids = input_ids.to(device)
        if cfg.video_token_id is not None and bool((input_ids == cfg.video_token_id).any()):
            raise NotImplementedError("input_ids contain video tokens; mechvlm supports images only")
        key_padding = padding_from_attention_mask(attention_mask, input_ids, device)
        if image_grid_thw is None and pixel_values is not None:
            raise ValueError("pixel_values given without image_grid_thw")
        if image_grid_thw is not None:
            if pixel_values is None:
                raise ValueError("image_grid_thw given without pixel_values")
            n_patches = int(image_grid_thw.prod(-1).sum())
            if pixel_values.shape[0] != n_patches:
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw "
                    f"describes {n_patches} patches"
                )
        spans = self.image_spans(cfg, input_ids, image_grid_thw, key_padding, image_cells)
        position_ids = mrope_position_ids(input_ids.shape, spans, key_padding).to(device)
        return PreparedInputs(input_ids, key_padding, spans, position_ids)


def mrope_position_ids(
    shape: torch.Size, spans: list[ImageSpan], key_padding: Tensor | None
) -> Int[Tensor, "3 batch pos"]:
    """Qwen2.5-VL's 3-D positions (HF ``get_rope_index`` for images).

    Over the real tokens of each row: a text run continues ``arange`` from the current
    position ``p``; an image with merged grid (t, h, w) gets ``T = p + t_idx``,
    ``H = p + row``, ``W = p + col`` (row-major), then ``p += max(h, w)``. Padding
    positions stay 0. The end-of-image token is ordinary text. A span holding some cells
    only (``ImageSpan.cells``) gives its tokens the positions of those cells.
    """
    batch, seq = shape
    out = torch.zeros(3, batch, seq, dtype=torch.long)
    real = key_padding.cpu() if key_padding is not None else torch.ones(batch, seq, dtype=torch.bool)
    for row in range(batch):
        real_pos = real[row].nonzero().squeeze(1)
        rows = torch.empty(3, len(real_pos), dtype=torch.long)
        compact = torch.cumsum(real[row].long(), 0) - 1  # full position -> index among real tokens
        cursor, p = 0, 0
        for s in (s for s in spans if s.row == row):
            start = int(compact[s.start])
            rows[:, cursor:start] = torch.arange(start - cursor) + p
            p += start - cursor
            t, h, w = s.grid
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            grid_pos = torch.stack([tt, hh, ww]).reshape(3, -1)
            if s.cells is not None:
                grid_pos = grid_pos[:, list(s.cells)]
            rows[:, start:start + s.n_tokens] = grid_pos + p
            p += max(h, w)
            cursor = start + s.n_tokens
        rows[:, cursor:] = torch.arange(len(real_pos) - cursor) + p
        out[:, row, real_pos] = rows
    return out


QWEN2_5_VL = register_family(Qwen2_5_VLFamily())
