"""Inputs of the TransformerLens test ports: each model-level test runs on the shipped toy
Qwen2.5-VL and Gemma3 (``fold_ln=True``, as TransformerLens loads its models), once with a
text-only input and once with an image."""

from __future__ import annotations

import functools

from _tl_models import FAMILIES, scene_images

VARIANTS = [(f, k) for f in FAMILIES for k in ("text", "image")]


def image_placeholder(model) -> str:
    """The text one image stands for in a raw (no chat template) prompt."""
    return "<|vision_start|><|image_pad|><|vision_end|>" if model.cfg.model_type == "qwen2_5_vl" else "<start_of_image>"


def make_input(model, kind: str, text: str | list[str], image_index: int = 0):
    """TransformerLens passes text; the image variant passes a `VLMBatch` of one toy scene
    followed by the same text (raw, no chat template; vision features precomputed). The
    batches are memoised (tests only read them)."""
    if kind == "text":
        return text
    return _image_input(model, text if isinstance(text, str) else tuple(text), image_index)


@functools.lru_cache(maxsize=256)
def _image_input(model, text, image_index: int):
    texts = [text] if isinstance(text, str) else list(text)
    ims = scene_images()
    bos = model.tokenizer.bos_token if model.cfg.default_prepend_bos else ""
    return model.to_inputs([bos + image_placeholder(model) + t for t in texts],
                           [[ims[(image_index + i) % len(ims)]] for i in range(len(texts))],
                           chat_template=False, with_image_embeds=True)


def n_tokens(model, inp) -> int:
    return (model.to_tokens(inp) if isinstance(inp, (str, list)) else inp["input_ids"]).shape[-1]
