"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout
with OneVision's own rules (Qwen2 LM, SigLIP tower without CLS, ``"full"`` features).

What differs from LLaVA-NeXT (transformers 5.23, ``LlavaOnevisionModel``):
    * anyres-max (``vision_aspect_ratio = "anyres_max_N"``): after unpadding, a canvas of
      more than about N tiles is downsampled bilinearly (see `anyres_layout`);
    * ``batch_num_images`` (the processor's output): in a row with several images every
      image is its overview only, plus one newline token; a row with one image is tiled.
      Without it HF (and mechvlm) tile every image.
Videos (``pixel_values_videos``) are not supported here and raise.
"""

from __future__ import annotations

import torch

from mechvlm.config import VLMConfig
from mechvlm.models.base import register_family
from mechvlm.models.llava_next import LlavaNextFamily


class LlavaOnevisionFamily(LlavaNextFamily):
    model_type = "llava_onevision"
    hf_class_name = "LlavaOnevisionForConditionalGeneration"
    name = "LLaVA-OneVision"
    visual_inputs = ("image_sizes", "batch_num_images")

    def layout_config(self, hf_config) -> dict:
        aspect = hf_config.vision_aspect_ratio
        if not (isinstance(aspect, str) and aspect.startswith("anyres_max_")):
            raise NotImplementedError(f"{self.name} vision_aspect_ratio {aspect!r} is not supported (anyres_max_N)")
        return {**super().layout_config(hf_config), "max_patches": int(aspect.strip("anyres_max_")),
                "unsupported_video_token_id": hf_config.video_token_id}

    def patched(self, cfg: VLMConfig, n_images: int, **visual) -> list[bool]:
        per_row = visual.get("batch_num_images")
        if per_row is None:
            return [True] * n_images
        counts = [int(n) for n in torch.as_tensor(per_row).reshape(-1).tolist()]
        if sum(counts) != n_images:
            raise ValueError(f"batch_num_images {counts} sums to {sum(counts)}, but there are {n_images} image(s) "
                             "(image_sizes rows)")
        return [n == 1 for n in counts for _ in range(n)]

    def image_spans(self, cfg, input_ids, image_grid_thw, key_padding, image_cells=None, **visual):
        if visual.get("pixel_values_videos") is not None or visual.get("video_grid_thw") is not None:
            raise NotImplementedError(f"mechvlm's {self.name} does not support video inputs")
        video = cfg.extra.get("unsupported_video_token_id")
        if video is not None and bool((input_ids == video).any()):
            raise NotImplementedError(f"input_ids contain video tokens (id {video}); mechvlm's {self.name} "
                                      "supports images only")
        try:
            spans = super().image_spans(cfg, input_ids, image_grid_thw, key_padding, image_cells, **visual)
        except ValueError as e:
            if visual.get("batch_num_images") is None and "do not match" in str(e):
                raise ValueError(f"{e}. (Rows with several images use the overview only when batch_num_images "
                                 "is given, as the processor returns it.)") from e
            raise
        if visual.get("batch_num_images") is not None:
            given = [int(n) for n in torch.as_tensor(visual["batch_num_images"]).reshape(-1).tolist()]
            found = [sum(s.row == r for s in spans) for r in range(input_ids.shape[0])]
            if given != found:
                raise ValueError(f"batch_num_images {given} disagrees with the images per row in input_ids {found}")
        return spans


LLAVA_ONEVISION = register_family(LlavaOnevisionFamily())
