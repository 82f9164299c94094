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

    from mechvlm.models import family_for

    config = transformers.AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
    cls = getattr(transformers, family_for(config).hf_class_name)
    model = cls.from_pretrained(name_or_path, dtype=dtype or "auto", attn_implementation="eager", **hf_kwargs)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False)


def try_processor(name_or_path: str | None, **hf_kwargs):
    """``(AutoProcessor.from_pretrained(...), "")``, or ``(None, why not)`` when there is
    none (a tiny test dir without tokenizer files, or an environment that cannot build it:
    in transformers 5.23 the Qwen2.5-VL processor needs torchvision for its video part)."""
    if not isinstance(name_or_path, str):
        return None, "the model was given in memory"
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(name_or_path, **hf_kwargs)
    except Exception as e:  # noqa: BLE001 - no processor files, no tokenizer, ...
        return None, f"AutoProcessor failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not (hasattr(proc, "image_processor") and hasattr(proc, "tokenizer")):
        return None, f"AutoProcessor gave a {type(proc).__name__}, not a multimodal processor"
    return proc, ""


def synthetic_image(size: int = 224):
    """A deterministic RGB test picture (colour gradients and a checkerboard)."""
    from PIL import Image

    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((x // (size // 8) + y // (size // 8)) % 2).float()
    rgb = torch.stack([x.float() / size, y.float() / size, 0.3 + 0.5 * checker], -1)
    return Image.fromarray((rgb * 255).clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def processor_inputs(processor, image=None, prompt: str | None = None) -> dict:
    """Chat-template inputs for one image and one prompt (the processor's own output,
    including ``mm_token_type_ids`` / ``token_type_ids``)."""
    from PIL import Image

    if image is None:
        image = synthetic_image()
    elif not isinstance(image, Image.Image):
        image = Image.open(image).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or DEFAULT_PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


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
    """Inputs and how they were made: with the processor of ``source`` when it has one
    (``image``: a path or PIL image, default a synthetic picture), otherwise a synthetic
    prompt of the model's family (``image``/``prompt`` then cannot be used)."""
    processor, why = try_processor(source, **hf_kwargs)
    if processor is not None:
        return processor_inputs(processor, image, prompt), "processor"
    if image is not None or prompt is not None:
        raise ValueError(f"{source!r} has no usable processor ({why}), so an image/prompt cannot be "
                         "turned into inputs; leave both out for a synthetic prompt, or pass a batch")
    return synthetic_inputs(config, seed), "synthetic"


def as_batch(inputs: dict) -> dict[str, Tensor]:
    """Keep the tensors of a processor / user batch (drop ``None`` and non-tensors)."""
    return {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
