"""Qwen2.5-VL: config mapping, weight conversion, vision encoder and mRoPE positions.

The math of the backbone (`transformers.models.qwen2_5_vl`, see shared UPSTREAM_NOTES):
pre-norm blocks, RMSNorm cast back before the weight, q/k/v with bias, GQA, SiLU-gated
MLP, multimodal RoPE over (t, h, w) position rows. Positions are built here from
``input_ids``, ``image_grid_thw`` and ``video_grid_thw``; unlike HF, there is no silent
1-D fallback when ``mm_token_type_ids`` is absent.

Videos (``<|vision_start|> <|video_pad|> x t*h*w/merge**2 <|vision_end|>``): the same
tower encodes ``pixel_values_videos`` with ``video_grid_thw`` (``t`` temporal patches of
``temporal_patch_size`` frames each). As HF's ``get_rope_index`` (transformers 5.23), the
temporal position of patch ``i`` is ``p + long(i * tokens_per_second *
second_per_grid_ts[v])`` (``second_per_grid_ts`` defaults to 1 per video), and the text
after a video continues at ``p + max(h, w) / merge``, as after an image, however far the
temporal positions went.
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
    VisualInput,
    build_standard_block,
    check_input_ids,
    padding_from_attention_mask,
    prenorm_state_dict,
    prenorm_state_dict_to_hf,
    register_family,
    reject_unused,
)

_VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

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
            extra={"tokens_per_second": hf_config.vision_config.tokens_per_second},
        )

    def build_block(self, cfg: VLMConfig, layer: int) -> TransformerBlock:
        return build_standard_block(cfg, layer, qkv_bias=True)

    def rotary(self, cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
        table = RotaryEmbedding(cfg.d_head, cfg.rope_theta, mrope_section=cfg.mrope_section)
        return {t: table for t in set(cfg.layer_types)}

    def state_dict_from_hf(self, hf_model: nn.Module) -> dict[str, Tensor]:
        return prenorm_state_dict(hf_model.model.language_model, hf_model.lm_head)

    def state_dict_to_hf(self, weights: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
        return prenorm_state_dict_to_hf(weights, cfg)

    vision_prefixes = {"vision.visual.": "model.visual."}

    def vision_encoder(self, hf_model: nn.Module) -> nn.Module:
        return QwenVisionEncoder(hf_model.model.visual)

    # --- inputs ----------------------------------------------------------------------
    def merged_grids(self, cfg: VLMConfig, grid_thw: Tensor, name: str = "image_grid_thw",
                     what: str = "image") -> list[tuple[int, int, int]]:
        m = cfg.spatial_merge_size
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"{name} must be [n_{what}s, 3], got {tuple(grid_thw.shape)}")
        grids = []
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            if h % m or w % m:
                raise ValueError(f"{what} {i}: grid (t={t}, h={h}, w={w}) is not divisible by the merge size {m}")
            grids.append((t, h // m, w // m))
        return grids

    def _modality_spans(self, cfg, input_ids, key_padding, grid_thw, *, modality: str, cells=None) -> list[ImageSpan]:
        token_id = cfg.image_token_id if modality == "image" else cfg.video_token_id
        name = f"{modality}_grid_thw"
        if grid_thw is None:
            n_tokens = int((input_ids == token_id).sum())
            if n_tokens:
                pixels = "pixel_values" if modality == "image" else "pixel_values_videos"
                raise ValueError(
                    f"input_ids contain {n_tokens} {modality} tokens (id {token_id}) but {name} is None: "
                    f"pass the {name} (and {pixels}) of the {modality}s"
                )
            return []
        return find_image_spans(input_ids, token_id, self.merged_grids(cfg, grid_thw, name, modality), key_padding,
                                modality=modality, cells=cells)

    def image_spans(self, cfg, input_ids, image_grid_thw, key_padding, image_cells=None, **visual) -> list[ImageSpan]:
        """The image spans, then the video spans; ``image_cells`` applies to the images only."""
        reject_unused(visual, "Qwen2.5-VL", _VIDEO_INPUTS)
        return (self._modality_spans(cfg, input_ids, key_padding, image_grid_thw, modality="image", cells=image_cells)
                + self._modality_spans(cfg, input_ids, key_padding, visual.get("video_grid_thw"), modality="video"))

    def prepare_inputs(self, cfg, input_ids, pixel_values, image_grid_thw, attention_mask, device,
                       token_type_ids=None, image_cells=None, **visual):
        """See `ModelFamily.prepare_inputs`. With ``image_cells``, each kept image token keeps
        the mRoPE position of its grid cell and the text after the image keeps its positions
        (the grid still advances the position by ``max(h, w)``): removing a token changes
        nothing else, as masking it as a key would. Videos keep all their tokens."""
        if token_type_ids is not None:
            raise ValueError("token_type_ids is not used by Qwen2.5-VL (it is a Gemma3 input); drop it")
        reject_unused(visual, "Qwen2.5-VL", _VIDEO_INPUTS)
        check_input_ids(input_ids)
        input_ids = input_ids.to(device)
        key_padding = padding_from_attention_mask(attention_mask, input_ids, device)
        video_grid_thw, pixel_values_videos = visual.get("video_grid_thw"), visual.get("pixel_values_videos")
        _check_patches(pixel_values, image_grid_thw, "pixel_values", "image_grid_thw")
        _check_patches(pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw")
        spans = self.image_spans(cfg, input_ids, image_grid_thw, key_padding, image_cells, video_grid_thw=video_grid_thw)
        videos = [s for s in spans if s.modality == "video"]
        steps = video_time_steps(cfg.extra["tokens_per_second"], visual.get("second_per_grid_ts"), len(videos))
        position_ids = mrope_position_ids(input_ids.shape, spans, key_padding,
                                          {s: steps[s.image] for s in videos}).to(device)
        inputs = []
        for modality, pv, grid in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)):
            n = sum(s.n_cells for s in spans if s.modality == modality)
            if n:
                token_id = cfg.image_token_id if modality == "image" else cfg.video_token_id
                inputs.append(VisualInput(modality, token_id, {"pixel_values": pv, "image_grid_thw": grid}, n))
        return PreparedInputs(input_ids, key_padding, spans, position_ids, visual=inputs)


def _check_patches(pixel_values: Tensor | None, grid_thw: Tensor | None, pixels: str, grid: str) -> None:
    if grid_thw is None and pixel_values is not None:
        raise ValueError(f"{pixels} given without {grid}")
    if grid_thw is not None:
        if pixel_values is None:
            raise ValueError(f"{grid} given without {pixels}")
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(f"{pixels} has {pixel_values.shape[0]} patch rows but {grid} describes {n_patches} patches")


def video_time_steps(tokens_per_second, second_per_grid_ts, n_videos: int) -> list:
    """The temporal position step of each video: ``tokens_per_second * second_per_grid_ts[v]``
    computed as HF does (the element as given: a Python float or a 0-d tensor; 1 when
    ``second_per_grid_ts`` is None)."""
    if second_per_grid_ts is None:
        return [tokens_per_second * 1] * n_videos
    if isinstance(second_per_grid_ts, Tensor):
        second_per_grid_ts = second_per_grid_ts.detach().cpu()
        if second_per_grid_ts.ndim != 1:
            raise ValueError(f"second_per_grid_ts must be [n_videos], got shape {tuple(second_per_grid_ts.shape)}")
    seconds = list(second_per_grid_ts)
    if len(seconds) != n_videos:
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n_videos} video(s)")
    return [tokens_per_second * sec for sec in seconds]


def mrope_position_ids(
    shape: torch.Size, spans: list[ImageSpan], key_padding: Tensor | None, time_steps: dict | None = None,
) -> Int[Tensor, "3 batch pos"]:
    """Qwen2.5-VL's 3-D positions (HF ``get_rope_index``).

    Over the real tokens of each row: a text run continues ``arange`` from the current
    position ``p``; an image with merged grid (t, h, w) gets ``T = p + t_idx``,
    ``H = p + row``, ``W = p + col`` (row-major), then ``p += max(h, w)``. A video span
    in ``time_steps`` (span -> step, see `video_time_steps`) gets ``T = p +
    long(t_idx * step)`` instead. Padding positions stay 0. The end-of-image token is
    ordinary text. A span holding some cells only (``ImageSpan.cells``) gives its tokens
    the positions of those cells.
    """
    time_steps = time_steps or {}
    batch, seq = shape
    out = torch.zeros(3, batch, seq, dtype=torch.long)
    real = key_padding.cpu() if key_padding is not None else torch.ones(batch, seq, dtype=torch.bool)
    for row in range(batch):
        real_pos = real[row].nonzero().squeeze(1)
        rows = torch.empty(3, len(real_pos), dtype=torch.long)
        compact = torch.cumsum(real[row].long(), 0) - 1  # full position -> index among real tokens
        cursor, p = 0, 0
        for s in sorted((s for s in spans if s.row == row), key=lambda s: s.start):
            start = int(compact[s.start])
            rows[:, cursor:start] = torch.arange(start - cursor) + p
            p += start - cursor
            t, h, w = s.grid
            frames = torch.arange(t) if s not in time_steps else (torch.arange(t) * time_steps[s]).long()
            tt, hh, ww = torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij")
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
