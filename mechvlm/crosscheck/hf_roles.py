"""Token roles for the HF side, from ``input_ids`` and the HF config alone.

Independent of `mechvlm.roles` on purpose: the nnsight side must not ask mechvlm which
token is which. The rule is the one METHODS.md §1 states (and `mechvlm.roles` documents):

    image: the image placeholder id (Qwen ``<|image_pad|>``, Gemma3 image soft token,
           LLaVA ``<image>``) or the video placeholder id (Qwen ``<|video_pad|>``);
    eoi:   the end-of-image id (Qwen ``<|vision_end|>``, Gemma3 ``<end_of_image>``; LLaVA
           has none: no token is EOI);
    text:  real tokens after the first image-start / image token that are none of
           image, eoi, image-start, nor a BOS at the first real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HFRoles:
    image: Tensor  # [batch, pos] bool
    eoi: Tensor
    text: Tensor
    real: Tensor

    def key(self, name: str) -> Tensor:
        if name not in ("image", "eoi", "text"):
            raise ValueError(f"the cross-check knows key roles 'image', 'eoi' and 'text', got {name!r}")
        return getattr(self, name)


SUPPORTED = ("qwen2_5_vl", "gemma3", "llava", "llava_next", "llava_onevision")


def special_ids(config) -> dict[str, int | None]:
    """image / video / image_start / eoi / bos ids of a supported HF config (None: the model
    has no such token)."""
    mt = config.model_type
    tc = config.get_text_config()
    if mt == "qwen2_5_vl":
        return dict(image=config.image_token_id, video=config.video_token_id, start=config.vision_start_token_id,
                    eoi=config.vision_end_token_id, bos=tc.bos_token_id)
    if mt == "gemma3":
        return dict(image=config.image_token_id, video=None, start=config.boi_token_id,
                    eoi=config.eoi_token_id, bos=tc.bos_token_id)
    if mt in ("llava", "llava_next", "llava_onevision"):
        return dict(image=config.image_token_id, video=None, start=None, eoi=None, bos=tc.bos_token_id)
    raise NotImplementedError(f"the cross-check supports {SUPPORTED}, not {mt!r}")


def _is(input_ids: Tensor, token_id: int | None) -> Tensor:
    return input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)


def hf_roles(config, input_ids: Tensor, attention_mask: Tensor | None = None) -> HFRoles:
    ids = special_ids(config)
    b, n = input_ids.shape
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    image = (_is(input_ids, ids["image"]) | _is(input_ids, ids["video"])) & real
    eoi = _is(input_ids, ids["eoi"]) & real
    start = _is(input_ids, ids["start"]) & real
    pos = torch.arange(n, device=input_ids.device).expand(b, n)
    first = torch.where(image | start, pos, n).min(-1).values[:, None]
    first_real = torch.where(real, pos, n).min(-1).values[:, None]
    bos = (pos == first_real) & (input_ids == ids["bos"]) if ids["bos"] is not None else torch.zeros_like(real)
    text = real & (pos > first) & ~image & ~eoi & ~start & ~bos
    return HFRoles(image=image, eoi=eoi, text=text, real=real)
