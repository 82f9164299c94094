"""Tiny random LLaVA-1.5 / NeXT / OneVision models and batches for the tests.

Token counts per image come from HF's own ``get_image_features`` (the reference), never
from mechvlm's layout code."""

from __future__ import annotations

import torch
import transformers

from conftest import randomize_
from mechvlm.synthetic import LLAVA_IDS, left_pad, llava_config, llava_prompt

HF_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
              "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
FAMILIES = tuple(HF_CLASSES)


def make_hf_llava(family: str, seed: int = 0, attn: str = "eager", **config_kw):
    torch.manual_seed(seed)
    cfg = llava_config(family, **config_kw)
    model = getattr(transformers, HF_CLASSES[family])._from_config(cfg, attn_implementation=attn).eval()
    return randomize_(model, seed)


def hf_feature_counts(hf, pixel_values, **kw) -> list[int]:
    with torch.no_grad():
        return [f.shape[0] for f in hf.model.get_image_features(pixel_values, **kw).pooler_output]


def llava_batch(hf, rows: list[list], sizes=None, seed: int = 0, per_row_images: bool = False) -> dict:
    """mechvlm inputs: ``rows`` of prompt segments (ints, ``"image"``); ``sizes``: the
    original (height, width) of each image (NeXT / OneVision); ``per_row_images``:
    OneVision's ``batch_num_images`` (rows with several images: overview only)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = hf.config
    px = cfg.vision_config.image_size
    n_images = sum(seg == "image" for segs in rows for seg in segs)
    batch, kw = {}, {}
    if cfg.model_type == "llava":
        pv = torch.randn(n_images, 3, px, px, generator=g)
    else:
        sizes = torch.tensor(sizes)
        assert len(sizes) == n_images
        tiles = max(image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, px) for s in sizes)
        pv = torch.randn(n_images, tiles, 3, px, px, generator=g)
        kw["image_sizes"] = sizes
        if per_row_images:
            kw["batch_num_images"] = torch.tensor([sum(seg == "image" for seg in segs) for segs in rows])
    counts = iter(hf_feature_counts(hf, pv, **kw))
    ids = [llava_prompt(segs, [next(counts) for seg in segs if seg == "image"], generator=g)[0] for segs in rows]
    input_ids, mask = (ids[0][None], None) if len(ids) == 1 else left_pad(ids, LLAVA_IDS["pad"])
    batch.update(input_ids=input_ids, pixel_values=pv, **kw)
    if mask is not None:
        batch["attention_mask"] = mask
    return batch


def hf_kwargs(batch: dict) -> dict:
    """HF's inputs: the same, with real-token positions under left padding (HF's forward
    would count the pads; ``generate`` does not)."""
    kw = dict(batch)
    am = batch.get("attention_mask")
    if am is not None:
        kw["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    return kw
