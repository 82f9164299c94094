"""The shipped toy checkpoints (tiny Qwen2.5-VL and Gemma3 with tokenizer and image
processor) loaded once per test session, and image inputs for them."""

from __future__ import annotations

import functools

import torch
from PIL import Image

from mechvlm import HookedVLM
from mechvlm.toy.checkpoint import SHIPPED
from mechvlm.toy.scenes import make_scenes

FAMILIES = ("qwen2_5_vl", "gemma3")


@functools.lru_cache(maxsize=None)
def toy_model(family: str, fold_ln: bool = True) -> HookedVLM:
    """Read-only use: tests that change hooks or switches must undo them."""
    return HookedVLM.from_pretrained(str(SHIPPED[family]), dtype=torch.float32, fold_ln=fold_ln)


@functools.lru_cache(maxsize=None)
def scene_images(n: int = 4, seed: int = 0) -> tuple:
    return tuple(Image.fromarray(s.image) for s in make_scenes(n, seed=seed))


def image_batch(model: HookedVLM, prompts=("What color is the shape?",), image_index: int = 0,
                with_image_embeds: bool = False):
    """``to_inputs`` of the prompts, each with one toy scene (``image_index + row``)."""
    ims = scene_images()
    return model.to_inputs(list(prompts), [[ims[(image_index + i) % len(ims)]] for i in range(len(prompts))],
                           with_image_embeds=with_image_embeds)
