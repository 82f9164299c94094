"""Loading the HF model and building the inputs of a cross-check."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_PROMPT = "Describe the image."


def load_hf_eager(name_or_path: str, *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, **hf_kwargs) -> nn.Module:
    """Load a hub id or a local HF directory in eager attention (``dtype=None``: the
    checkpoint's)."""
    import transformers

    from mechvlm.checkpoint_check import load_hf_checked, load_hf_config
    from mechvlm.models import family_for

    config = load_hf_config(name_or_path, **hf_kwargs)
    cls = getattr(transformers, family_for(config).hf_class_name)
    model = load_hf_checked(cls, name_or_path, dtype=dtype or "auto", attn_implementation="eager", **hf_kwargs)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)


def try_input_builder(name_or_path: str | None):
    """``(InputBuilder.from_pretrained(dir), "")``: the checkpoint's own tokenizer (chat
    template) and image processor, expanding each image to the model config's number of
    tokens; or ``(None, why not)`` when the directory has none (a tiny test dir without
    tokenizer files). HF's ``AutoProcessor`` is not used: in transformers 5.x the Qwen2.5-VL
    processor needs torchvision for its video part, and a Gemma3 processor saved without
    ``image_seq_length`` expands an image to 256 tokens whatever the model's config says."""
    if not isinstance(name_or_path, str):
        return None, "the model was given in memory"
    from mechvlm.processing import InputBuilder

    try:
        builder = InputBuilder.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - no tokenizer, no chat template, no image processor, ...
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
        return None, f"InputBuilder.from_pretrained failed: {type(e).__name__}: {msg}"
    return builder, ""


def synthetic_image(size: int = 224):
    """A deterministic RGB test picture (colour gradients and a checkerboard)."""
    from PIL import Image

    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((x // (size // 8) + y // (size // 8)) % 2).float()
    rgb = torch.stack([x.float() / size, y.float() / size, 0.3 + 0.5 * checker], -1)
    return Image.fromarray((rgb * 255).clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def builder_inputs(builder, image=None, prompt: str | None = None) -> dict:
    """Chat-template inputs for one image (a path or PIL image; default `synthetic_image`)
    and one prompt, built by `mechvlm.processing.InputBuilder`."""
    from PIL import Image

    if image is None:
        image = synthetic_image()
    elif not isinstance(image, Image.Image):
        image = Image.open(image).convert("RGB")
    return builder([prompt or DEFAULT_PROMPT], [[image]])


def synthetic_inputs(config, seed: int = 0) -> dict:
    """A random prompt ``text, image, text`` with random pixels, in the token layout of
    the model's family and with the special ids of its config (`mechvlm.synthetic`)."""
    from mechvlm import synthetic as syn

    g = torch.Generator().manual_seed(seed)
    tc = config.get_text_config()
    if config.model_type == "qwen2_5_vl":
        ids = dict(bos=tc.bos_token_id, eos=tc.eos_token_id, pad=tc.pad_token_id,
                   vision_start=config.vision_start_token_id, vision_end=config.vision_end_token_id,
                   image=config.image_token_id, video=config.video_token_id)
        ids = {k: v for k, v in ids.items() if v is not None}
        m = config.vision_config.spatial_merge_size
        if m != 2:
            raise NotImplementedError(f"synthetic Qwen prompts assume spatial_merge_size 2, got {m}")
        input_ids, grid = syn.qwen_prompt([5, (1, 4, 6), 8], ids=ids, vocab=tc.vocab_size, generator=g)
        vc = config.vision_config
        pixels = syn.qwen_pixel_values(grid, patch=vc.patch_size, temporal=vc.temporal_patch_size, generator=g)
        return {"input_ids": input_ids, "pixel_values": pixels, "image_grid_thw": grid}
    if config.model_type == "gemma3":
        ids = dict(pad=tc.pad_token_id, eos=tc.eos_token_id, bos=tc.bos_token_id, boi=config.boi_token_id,
                   eoi=config.eoi_token_id, image=config.image_token_id)
        input_ids = syn.gemma3_prompt([4, "image", 8], ids=ids, mm_tokens=config.mm_tokens_per_image,
                                      vocab=tc.vocab_size, generator=g)
        pixels = syn.gemma3_pixel_values(1, image_size=config.vision_config.image_size, generator=g)
        return {"input_ids": input_ids, "pixel_values": pixels}
    if config.model_type in ("llava", "llava_next", "llava_onevision"):
        return _llava_inputs(config, g)
    raise NotImplementedError(f"the cross-check supports qwen2_5_vl, gemma3 and the LLaVA family, "
                              f"not {config.model_type!r}")


def _llava_inputs(config, g: torch.Generator) -> dict:
    """``text, image, text``; LLaVA-NeXT / OneVision get a wide image of two tiles (its token
    count from mechvlm's anyres layout, which HF's feature count then checks)."""
    from mechvlm import synthetic as syn
    from mechvlm.models import family_for
    from mechvlm.models.llava_next import anyres_layout, num_tiles

    family = family_for(config)
    cfg = family.config_from_hf(config, dtype=torch.float32, device="cpu")
    tc, px = config.get_text_config(), config.vision_config.image_size
    out = {}
    if config.model_type == "llava":
        n_tokens = family.tile_layout(cfg).n_tokens
        out["pixel_values"] = torch.randn(1, 3, px, px, generator=g)
    else:
        size = (px, 2 * px)
        n_tokens = anyres_layout(cfg, size, max_patches=cfg.extra.get("max_patches")).n_tokens
        out["pixel_values"] = torch.randn(1, num_tiles(cfg, size), 3, px, px, generator=g)
        out["image_sizes"] = torch.tensor([size])
    ids = {k: v for k, v in dict(bos=tc.bos_token_id, eos=tc.eos_token_id, pad=tc.pad_token_id,
                                  image=config.image_token_id).items() if v is not None}
    bos = tc.model_type == "llama" and tc.bos_token_id is not None
    out["input_ids"] = syn.llava_prompt([5, "image", 8], [n_tokens], ids=ids, vocab=tc.vocab_size, bos=bos,
                                        generator=g)
    return out


def build_inputs(config, source: str | None = None, *, image=None, prompt: str | None = None,
                 seed: int = 0, **hf_kwargs) -> tuple[dict, str]:
    """Inputs and how they were made: with the checkpoint's own tokenizer and image
    processor (`InputBuilder`) when ``source`` has them (``image``: a path or PIL image,
    default a synthetic picture), otherwise a synthetic prompt of the model's family
    (``image``/``prompt`` then cannot be used)."""
    builder, why = try_input_builder(source)
    if builder is not None:
        return builder_inputs(builder, image, prompt), "processor"
    if image is not None or prompt is not None:
        raise ValueError(f"{source!r} has no usable processor ({why}), so an image/prompt cannot be "
                         "turned into inputs; leave both out for a synthetic prompt, or pass a batch")
    return synthetic_inputs(config, seed), "synthetic"


def as_batch(inputs: dict) -> dict[str, Tensor]:
    """Keep the tensors of a processor / user batch (drop ``None`` and non-tensors)."""
    return {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
