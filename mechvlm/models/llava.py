"""LLaVA-1.5 (``LlavaForConditionalGeneration``): config mapping, weight conversion, vision
encoder and input layout. The LLaVA-NeXT and OneVision families extend it.

The language model is the HF decoder of ``text_config`` (Llama / Vicuna, Qwen2: see
`mechvlm.models.decoder_lm`): the shared pre-norm block with 1-D RoPE. The vision side is
HF's own tower, projector (and ``image_newline``), run by HF's own ``get_image_features``
(`LlavaVisionEncoder`), frozen.

Input layout (transformers 5.23, ``models/llava``):
    * The processor expands each ``<image>`` into one placeholder per feature; the features
      are ``masked_scatter``ed in sequence order. There is no image-start and no
      end-of-image token: the ``eoi`` and ``image_start`` roles are missing (asking for
      them raises `mechvlm.roles.MissingRoleError`).
    * Tokens per image: the tower's ``(image_size / patch_size)**2`` patches, row-major,
      plus the CLS token (CLIP) unless ``vision_feature_select_strategy == "default"``
      drops it (the LLaVA-1.5 checkpoints: 576 tokens of a 24x24 grid).
    * Positions: HF's forward counts left pads (``arange``); mechvlm counts real tokens,
      as ``generate`` does. With 1-D RoPE a per-row shift cancels in ``q.k``, so both
      agree up to rounding; the parity tests give HF the real-token positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechvlm.components import RotaryEmbedding, TransformerBlock
from mechvlm.config import VLMConfig
from mechvlm.image_layout import GridView, ImageLayout, ImageSpan, find_image_spans
from mechvlm.models.base import (
    ModelFamily,
    PreparedInputs,
    VisualInput,
    build_standard_block,
    check_input_ids,
    padding_from_attention_mask,
    prenorm_state_dict,
    prenorm_state_dict_to_hf,
    real_token_positions,
    register_family,
    reject_unused,
)
from mechvlm.models.decoder_lm import decoder_fields, decoder_rotary

_TOWERS_WITH_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


class LlavaVisionEncoder(nn.Module):
    """HF's vision tower, multimodal projector and (NeXT / OneVision) ``image_newline`` of a
    LLaVA model, run by the HF model class's own ``get_image_features`` (and
    ``pack_image_features``), frozen. Holds no language model.

    ``forward(pixel_values, **kw)`` (``kw``: ``image_sizes``, ``batch_num_images``, as HF)
    returns ``[n_image_tokens, d_model]``, image after image, in the order of the
    placeholders.
    """

    def __init__(self, hf_inner: nn.Module):
        super().__init__()
        self.vision_tower = hf_inner.vision_tower
        self.multi_modal_projector = hf_inner.multi_modal_projector
        if getattr(hf_inner, "image_newline", None) is not None:
            self.image_newline = hf_inner.image_newline
        self.config = hf_inner.config
        self._hf_class = type(hf_inner)

    def pack_image_features(self, *args, **kwargs):  # called by HF's get_image_features
        return self._hf_class.pack_image_features(self, *args, **kwargs)

    def forward(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs) -> Tensor:
        if image_grid_thw is not None:
            raise ValueError("LLaVA takes no image_grid_thw")
        dtype = next(self.vision_tower.parameters()).dtype
        out = self._hf_class.get_image_features(self, pixel_values.to(dtype), return_dict=True, **kwargs)
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])


def tower_geometry(hf_config) -> dict:
    """``{"tile_side": cells per side, "tile_pixels", "cls": whether the features keep a CLS token}``."""
    vc = hf_config.vision_config
    if vc.model_type not in _TOWERS_WITH_CLS:
        raise NotImplementedError(f"LLaVA with a {vc.model_type!r} vision tower is not supported "
                                  f"(supported: {sorted(_TOWERS_WITH_CLS)})")
    has_cls = _TOWERS_WITH_CLS[vc.model_type]
    strategy = hf_config.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise NotImplementedError(f"vision_feature_select_strategy='default' drops the first patch of a "
                                  f"{vc.model_type} (it has no CLS token); not supported")
    return {"tile_side": vc.image_size // vc.patch_size, "tile_pixels": vc.image_size,
            "cls": has_cls and strategy == "full"}


class LlavaFamily(ModelFamily):
    model_type = "llava"
    hf_class_name = "LlavaForConditionalGeneration"
    name = "LLaVA"
    visual_inputs: tuple[str, ...] = ()

    def config_from_hf(self, hf_config, *, dtype: torch.dtype, device: str) -> VLMConfig:
        fields = decoder_fields(hf_config.text_config)
        extra = {**fields.pop("extra"), **tower_geometry(hf_config), **self.layout_config(hf_config)}
        return VLMConfig(
            architecture=self.hf_class_name, model_type=self.model_type, **fields,
            image_token_id=hf_config.image_token_id, image_start_token_id=None, image_end_token_id=None,
            video_token_id=None, tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            dtype=dtype, device=str(device), extra=extra,
        )

    def layout_config(self, hf_config) -> dict:
        """Family-specific ``cfg.extra`` entries of the input layout."""
        return {}

    def build_block(self, cfg: VLMConfig, layer: int) -> TransformerBlock:
        return build_standard_block(cfg, layer, qkv_bias=cfg.extra["qkv_bias"])

    def rotary(self, cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
        return decoder_rotary(cfg)

    def state_dict_from_hf(self, hf_model: nn.Module) -> dict[str, Tensor]:
        return prenorm_state_dict(hf_model.model.language_model, hf_model.lm_head)

    def state_dict_to_hf(self, weights: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
        return prenorm_state_dict_to_hf(weights, cfg)

    vision_prefixes = {"vision.vision_tower.": "model.vision_tower.",
                       "vision.multi_modal_projector.": "model.multi_modal_projector.",
                       "vision.image_newline": "model.image_newline"}

    def vision_encoder(self, hf_model: nn.Module) -> nn.Module:
        return LlavaVisionEncoder(hf_model.model)

    # --- inputs ----------------------------------------------------------------------
    def tile_layout(self, cfg: VLMConfig) -> ImageLayout:
        """One tile of the tower: a square grid, after a CLS token when it is kept."""
        n, cls = cfg.extra["tile_side"], cfg.extra["cls"]
        grid = (1, n, n)
        return ImageLayout(n * n + cls, grid, (GridView(int(cls), grid, name="base"),) if cls else ())

    def image_layouts(self, cfg: VLMConfig, input_ids: Tensor, image_cells=None, **visual) -> list[ImageLayout]:
        """The token layout of every image of the batch (feature order), without pixels
        (with ``image_cells``, one per entry: the tokens left no longer count the images)."""
        layout = self.tile_layout(cfg)
        if image_cells is not None and hasattr(image_cells, "__len__"):
            return [layout] * len(image_cells)
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if n_tokens % layout.n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}), not a whole "
                             f"number of images of {layout.n_tokens} tokens")
        return [layout] * (n_tokens // layout.n_tokens)

    def image_spans(self, cfg, input_ids, image_grid_thw, key_padding, image_cells=None, **visual) -> list[ImageSpan]:
        """See `ModelFamily.image_spans`; ``image_cells`` needs one-grid images (LLaVA-1.5
        without the CLS token): anyres images raise NotImplementedError."""
        reject_unused(visual, self.name, self.visual_inputs)
        if image_grid_thw is not None:
            raise ValueError(f"image_grid_thw is not used by {self.name}; drop it")
        layouts = self.image_layouts(cfg, input_ids, image_cells=image_cells, **visual)
        return find_image_spans(input_ids, cfg.image_token_id, layouts, key_padding, cells=image_cells)

    def check_pixels(self, cfg: VLMConfig, pixel_values: Tensor, spans: list[ImageSpan], **visual) -> None:
        size = cfg.extra["tile_pixels"]
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [n_images, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != len(spans):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} image(s) but input_ids hold "
                             f"{len(spans)} image(s)")

    def prepare_inputs(self, cfg, input_ids, pixel_values, image_grid_thw, attention_mask, device,
                       token_type_ids=None, image_cells=None, **visual):
        """See `ModelFamily.prepare_inputs`. Positions are 1-D over the real tokens, so with
        ``image_cells`` they are those of the shorter sequence (the text after a pruned
        image moves up), as in Gemma3."""
        if token_type_ids is not None:
            raise ValueError(f"token_type_ids is not used by {self.name} (it is a Gemma3 input); drop it")
        check_input_ids(input_ids)
        input_ids = input_ids.to(device)
        key_padding = padding_from_attention_mask(attention_mask, input_ids, device)
        spans = self.image_spans(cfg, input_ids, image_grid_thw, key_padding, image_cells, **visual)
        visual_inputs = []
        if spans:
            if pixel_values is None:
                raise ValueError(f"input_ids contain {len(spans)} image(s) (id {cfg.image_token_id}) but "
                                 "pixel_values is None: pass the images")
            self.check_pixels(cfg, pixel_values, spans, **visual)
            kwargs = {"pixel_values": pixel_values, **{k: visual[k] for k in self.visual_inputs
                                                       if visual.get(k) is not None}}
            visual_inputs.append(VisualInput("image", cfg.image_token_id, kwargs, sum(s.n_cells for s in spans)))
        elif pixel_values is not None:
            raise ValueError(f"pixel_values given but input_ids hold no image token (id {cfg.image_token_id})")
        positions = real_token_positions(key_padding, input_ids.shape).to(device)
        return PreparedInputs(input_ids, key_padding, spans, positions, visual=visual_inputs)


LLAVA = register_family(LlavaFamily())
