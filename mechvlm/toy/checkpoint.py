"""Toy checkpoints: exact Qwen2.5-VL / Gemma3 architectures at a few MB, saved in the
layout of the real ones (config, safetensors, tokenizer + chat template, image processor,
generation config), so ``HookedVLM.from_pretrained(dir)`` and ``InputBuilder.from_pretrained
(dir)`` load them as they load a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from .scenes import IMAGE_SIZE
from .tokenizer import SPECIALS, special_id, toy_tokenizer

FAMILIES = ("qwen2_5_vl", "gemma3")
#: families with a random-init toy (no shipped trained weights): tiny LLaVA checkpoints for tests
LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {family: ASSETS / f"toy_{family}" for family in FAMILIES}
# LLaVA toys: a tile is the whole 112 px toy image (8x8 tokens of 14 px); NeXT / OneVision tile
# it 1x2 / 2x1 / 2x2 (a toy scene is square: one 2-tile canvas, unpadded to 8x8 + newlines)
LLAVA_TOY_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def toy_config(family: str, vocab_size: int, *, d_model: int = 128, n_layers: int = 4,
               n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 384, vision_hidden: int = 64,
               vision_depth: int = 2):
    """The HF config of a toy model of ``family`` (random-init sized; see module doc)."""
    sid = lambda tok: special_id(family, tok)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        half = d_model // n_heads // 2
        mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        text = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                    num_hidden_layers=n_layers, num_attention_heads=n_heads,
                    num_key_value_heads=n_kv_heads, rms_norm_eps=1e-6, max_position_embeddings=2048,
                    bos_token_id=sid("<|endoftext|>"), eos_token_id=sid("<|im_end|>"),
                    pad_token_id=sid("<|endoftext|>"),
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=d_model, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1])
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=sid("<|image_pad|>"),
            video_token_id=sid("<|video_pad|>"), vision_start_token_id=sid("<|vision_start|>"),
            vision_end_token_id=sid("<|vision_end|>"), tie_word_embeddings=True)
    if family == "gemma3":
        from transformers import Gemma3Config

        head_dim = d_model // n_heads
        layer_types = ["sliding_attention"] * (n_layers - 1) + ["full_attention"]
        text = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                    num_hidden_layers=n_layers, num_attention_heads=n_heads,
                    num_key_value_heads=n_kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                    sliding_window=64, layer_types=layer_types, rms_norm_eps=1e-6,
                    max_position_embeddings=2048, pad_token_id=sid("<pad>"), eos_token_id=sid("<eos>"),
                    bos_token_id=sid("<bos>"),
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1e6}})
        vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_hidden_layers=vision_depth, num_attention_heads=2, image_size=IMAGE_SIZE,
                      patch_size=14, vision_use_head=False)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                            boi_token_index=sid("<start_of_image>"), eoi_token_index=sid("<end_of_image>"),
                            image_token_index=sid("<image_soft_token>"), tie_word_embeddings=True)
    if family in LLAVA_FAMILIES:
        from ..synthetic import llava_config

        ids = dict(pad=sid(SPECIALS[family][0]), image=sid("<image>"), video=sid(SPECIALS[family][-1]),
                   bos=sid("<s>") if family != "llava_onevision" else None,
                   eos=sid("</s>") if family != "llava_onevision" else sid("<|im_end|>"))
        return llava_config(family, vocab=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            n_kv_heads=n_kv_heads, d_mlp=d_mlp, image_size=IMAGE_SIZE, patch_size=14,
                            vision_hidden=vision_hidden, vision_depth=vision_depth,
                            pinpoints=LLAVA_TOY_PINPOINTS, aspect="anyres_max_9", ids=ids)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES + LLAVA_FAMILIES}")


def toy_image_processor(family: str):
    """The HF image processor (PIL backend) configured for the toy's 112x112 images."""
    if family in LLAVA_FAMILIES:
        import transformers

        square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        if family == "llava":
            return transformers.LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=square)
        if family == "llava_next":
            return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=square,
                                                          image_grid_pinpoints=LLAVA_TOY_PINPOINTS)
        return transformers.LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=LLAVA_TOY_PINPOINTS)
    if family == "qwen2_5_vl":
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                        patch_size=14, merge_size=2, temporal_patch_size=2)
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_toy(family: str, **sizes):
    """A randomly initialised toy HF model, its tokenizer and image processor."""
    import torch
    import transformers

    from ..models import family_for

    tokenizer = toy_tokenizer(family)
    config = toy_config(family, len(tokenizer), **sizes)
    model = getattr(transformers, family_for(config).hf_class_name)(config)
    if family == "gemma3":  # HF initialises the projector to zero: no gradient would reach SigLIP
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    return model, tokenizer, toy_image_processor(family)


def save_toy(model, tokenizer, image_processor, out: str | Path, record: dict | None = None) -> Path:
    """Save a toy checkpoint directory (safetensors) with its tokenizer, image processor,
    generation config and, if given, the training record as ``training.json``.

    The folder is written whole into a temporary sibling and renamed into place
    (`mechvlm.fileio.atomic_dir`): an interrupted save leaves the previous checkpoint (or
    none), never a mix. It replaces ``out`` entirely and carries a manifest
    (`mechvlm.outdir`); refusing a folder of the user's is the caller's job
    (`mechvlm.outdir.prepare_out_dir`, as ``train-toy`` does)."""
    from ..fileio import atomic_dir, write_text
    from ..outdir import write_manifest

    out = Path(out)
    family = model.config.model_type
    eos = {"qwen2_5_vl": ["<|im_end|>"], "gemma3": ["<eos>", "<end_of_turn>"], "llava": ["</s>"],
           "llava_next": ["</s>"], "llava_onevision": ["<|im_end|>"]}[family]
    eos = [special_id(family, t) for t in eos]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if record is not None:
            write_text(tmp / "training.json", json.dumps(record, indent=2) + "\n")
        write_manifest(tmp, command="mechvlm train-toy")
    return out


__all__ = ["FAMILIES", "LLAVA_FAMILIES", "SHIPPED", "SPECIALS", "build_toy", "save_toy", "toy_config", "toy_image_processor"]
