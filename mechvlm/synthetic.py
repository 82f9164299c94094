"""Synthetic HF configs and prompts: tiny random models for tests, mid-size for benchmarks.

Nothing here reaches a hub. The token-id layout mirrors the real checkpoints (an image is
``<vision_start> <image_pad> x N <vision_end>``), with small ids that fit a small vocab.
"""

from __future__ import annotations

import torch

# Token ids of the synthetic Qwen2.5-VL vocab (the real ones are 151652..151656).
QWEN_IDS = dict(bos=1, eos=2, pad=0, vision_start=250, vision_end=251, image=252, video=253)


def qwen2_5_vl_config(*, vocab: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                      n_kv_heads: int = 2, d_mlp: int = 128, mrope_section=(2, 3, 3),
                      vision_depth: int = 2, vision_hidden: int = 32, tie: bool = False, **text_overrides):
    """A Qwen2.5-VL config with the real architecture and tiny sizes.

    ``mrope_section`` must sum to ``d_model / n_heads / 2``. Extra keyword arguments
    override text-config fields (``sliding_window``, ``layer_types``, ...).
    """
    from transformers import Qwen2_5_VLConfig

    ids = QWEN_IDS
    text = dict(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-6,
        max_position_embeddings=4096, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)},
    )
    text.update(text_overrides)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=2, out_hidden_size=d_model, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=tie,
    )


def qwen2_5_vl_3b_text_config(n_layers: int = 4, **kw):
    """Qwen2.5-VL-3B's language dimensions (d_model 2048, 16 heads / 2 KV, d_mlp 11008,
    vocab 151936, tied) with few layers and a small vision tower, for benchmarks."""
    return qwen2_5_vl_config(vocab=151936, d_model=2048, n_layers=n_layers, n_heads=16, n_kv_heads=2,
                             d_mlp=11008, mrope_section=(16, 24, 24), vision_hidden=128, tie=True, **kw)


def qwen_prompt(segments: list, *, ids=QWEN_IDS, vocab: int = 256, generator: torch.Generator | None = None):
    """Token ids for a prompt given as a list of segments.

    Each segment is an int ``n`` (n random text tokens, avoiding special ids) or a tuple
    ``(t, h, w)``: an image with that *patch* grid (``h``, ``w`` even), written as
    ``<vision_start> <image_pad> x t*h*w/4 <vision_end>``.

    Returns ``(input_ids [1, pos], image_grid_thw [n_images, 3] or None)``.
    """
    toks: list[int] = []
    grids = []
    special = set(ids.values())
    for seg in segments:
        if isinstance(seg, int):
            pool = torch.tensor([i for i in range(3, min(vocab, 250)) if i not in special])
            toks += pool[torch.randint(len(pool), (seg,), generator=generator)].tolist()
        else:
            t, h, w = seg
            toks += [ids["vision_start"]] + [ids["image"]] * (t * h * w // 4) + [ids["vision_end"]]
            grids.append(list(seg))
    grid = torch.tensor(grids, dtype=torch.long) if grids else None
    return torch.tensor([toks], dtype=torch.long), grid


def qwen_pixel_values(image_grid_thw: torch.Tensor, *, patch: int = 14, temporal: int = 2,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random pixel values in the Qwen2.5-VL patch layout: ``[sum t*h*w, 3*temporal*patch*patch]``."""
    n = int(image_grid_thw.prod(-1).sum())
    return torch.randn(n, 3 * temporal * patch * patch, generator=generator)


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token rows into ``(input_ids, attention_mask)``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return ids, mask


# --- Gemma3 ------------------------------------------------------------------------------
# Token ids of the synthetic Gemma3 vocab (the real ones: pad 0, eos 1, bos 2, boi 255999,
# eoi 256000, image soft token 262144). All lie inside the vocab, as in the real checkpoints.
GEMMA3_IDS = dict(pad=0, eos=1, bos=2, boi=280, eoi=281, image=282)
GEMMA3_REAL_IDS = dict(pad=0, eos=1, bos=2, boi=255999, eoi=256000, image=262144)


def gemma3_config(*, vocab: int = 300, d_model: int = 64, n_layers: int = 6, n_heads: int = 4,
                  n_kv_heads: int = 2, head_dim: int = 16, d_mlp: int = 128, sliding_window: int = 6,
                  layer_types=None, mm_tokens: int = 4, image_size: int = 28, patch_size: int = 7,
                  vision_depth: int = 2, vision_hidden: int = 32, rope_factor: float | None = 8.0,
                  query_pre_attn_scalar: int = 16, ids=GEMMA3_IDS, **text_overrides):
    """A Gemma3 (``Gemma3ForConditionalGeneration``) config with the real architecture and
    tiny sizes.

    Default layers: sliding, sliding, full, sliding, sliding, full. The full layers use
    RoPE base 1e6 with linear scaling ``rope_factor`` (as the 4B+ checkpoints, factor 8),
    sliding layers base 1e4. ``mm_tokens`` must be a square dividing the SigLIP patch grid
    ``(image_size / patch_size)**2``. ``head_dim * n_heads`` need not equal ``d_model``.
    """
    from transformers import Gemma3Config

    if layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(n_layers)]
    full = {"rope_type": "default", "rope_theta": 1e6}
    if rope_factor is not None:
        full = {"rope_type": "linear", "factor": float(rope_factor), "rope_theta": 1e6}
    text = dict(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
        layer_types=list(layer_types), rms_norm_eps=1e-6, max_position_embeddings=4096,
        pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": full},
    )
    text.update(text_overrides)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_hidden_layers=vision_depth, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                        boi_token_index=ids["boi"], eoi_token_index=ids["eoi"],
                        image_token_index=ids["image"], tie_word_embeddings=True)


def gemma3_4b_text_config(n_layers: int = 6, **kw):
    """Gemma3-4B's language dimensions (d_model 2560, 8 heads / 4 KV, head_dim 256, d_mlp
    10240, vocab 262208, window 1024, 256 tokens per image of 896x896, real special ids)
    with few layers and a small SigLIP tower, for benchmarks. 5 sliding : 1 full."""
    kw.setdefault("layer_types", ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                  for i in range(n_layers)])
    return gemma3_config(vocab=262208, d_model=2560, n_layers=n_layers, n_heads=8, n_kv_heads=4,
                         head_dim=256, d_mlp=10240, sliding_window=1024, mm_tokens=256,
                         image_size=896, patch_size=14, vision_hidden=64,
                         query_pre_attn_scalar=256, ids=GEMMA3_REAL_IDS, **kw)


def gemma3_prompt(segments: list, *, ids=GEMMA3_IDS, mm_tokens: int = 4, vocab: int = 300,
                  bos: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[1, pos]`` for a prompt given as a list of segments.

    Each segment is an int ``n`` (n random text tokens, avoiding special ids) or the string
    ``"image"``: ``<boi> <image_soft_token> x mm_tokens <eoi>``. A BOS token is prepended
    when ``bos``. The images' pixel values come from `gemma3_pixel_values`.
    """
    toks: list[int] = [ids["bos"]] if bos else []
    special = set(ids.values())
    pool = torch.tensor([i for i in range(3, min(vocab, 250)) if i not in special])
    for seg in segments:
        if isinstance(seg, int):
            toks += pool[torch.randint(len(pool), (seg,), generator=generator)].tolist()
        elif seg == "image":
            toks += [ids["boi"]] + [ids["image"]] * mm_tokens + [ids["eoi"]]
        else:
            raise ValueError(f"a segment is an int or 'image', got {seg!r}")
    return torch.tensor([toks], dtype=torch.long)


def gemma3_pixel_values(n_images: int, *, image_size: int = 28,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Random pixel values ``[n_images, 3, image_size, image_size]``."""
    return torch.randn(n_images, 3, image_size, image_size, generator=generator)


# --- Qwen2.5-VL video ----------------------------------------------------------------------
def qwen_video_prompt(segments: list, *, ids=QWEN_IDS, vocab: int = 256, generator: torch.Generator | None = None):
    """As `qwen_prompt`, with ``("video", t, h, w)`` segments too: a video of ``t`` temporal
    patches on an ``h x w`` patch grid, ``<vision_start> <video_pad> x t*h*w/4 <vision_end>``.

    Returns ``(input_ids [1, pos], image_grid_thw or None, video_grid_thw or None)``."""
    toks: list[int] = []
    grids: dict[str, list] = {"image": [], "video": []}
    for seg in segments:
        if isinstance(seg, tuple) and seg and seg[0] == "video":
            t, h, w = seg[1:]
            toks += [ids["vision_start"]] + [ids["video"]] * (t * h * w // 4) + [ids["vision_end"]]
            grids["video"].append([t, h, w])
            continue
        part, grid = qwen_prompt([seg], ids=ids, vocab=vocab, generator=generator)
        toks += part[0].tolist()
        if grid is not None:
            grids["image"] += grid.tolist()
    as_tensor = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return torch.tensor([toks], dtype=torch.long), as_tensor(grids["image"]), as_tensor(grids["video"])


# --- LLaVA family -----------------------------------------------------------------------------
# Token ids of the synthetic LLaVA vocab (llava-1.5: <image> 32000, pad 32001; OneVision:
# <image> 151646, <video> 151647). All inside the vocab, as in the real checkpoints.
LLAVA_IDS = dict(pad=0, bos=1, eos=2, image=250, video=251)
LLAVA_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
LLAVA_ONEVISION_PINPOINTS = [[28, 56], [56, 28], [56, 56], [56, 84], [84, 56]]


def decoder_text_config(kind: str = "llama", *, vocab: int = 256, d_model: int = 64, n_layers: int = 2,
                        n_heads: int = 4, n_kv_heads: int = 2, d_mlp: int = 128, ids=LLAVA_IDS,
                        rope_parameters: dict | None = None, **overrides) -> dict:
    """A tiny Llama (``kind="llama"``) or Qwen2 text config as a dict (``model_type`` set)."""
    theta = 1e4 if kind == "llama" else 1e6
    text = dict(model_type=kind, vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": theta})
    text.update(overrides)
    return text


def vision_tower_config(kind: str = "clip", *, image_size: int = 28, patch_size: int = 7, hidden: int = 32,
                        depth: int = 2) -> dict:
    """A tiny CLIP (with CLS) or SigLIP (without) vision tower config as a dict."""
    out = dict(model_type="clip_vision_model" if kind == "clip" else "siglip_vision_model", hidden_size=hidden,
               intermediate_size=2 * hidden, num_hidden_layers=depth, num_attention_heads=2,
               image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        out["projection_dim"] = hidden
    return out


def llava_config(family: str = "llava", *, text: str | None = None, tower: str | None = None,
                 image_size: int = 28, patch_size: int = 7, vision_hidden: int = 32, vision_depth: int = 2,
                 strategy: str | None = None, feature_layer: int | list[int] | None = None,
                 pinpoints=None, aspect: str = "anyres_max_4", tie: bool = False, ids=LLAVA_IDS, **text_kw):
    """A tiny ``llava`` / ``llava_next`` / ``llava_onevision`` config with the real architecture.

    Defaults follow the released checkpoints: LLaVA-1.5 and NeXT a Llama LM, a CLIP tower,
    ``"default"`` features from layer -2; OneVision a Qwen2 LM, a SigLIP tower, ``"full"``
    features from layer -1 and ``anyres_max_4`` (the real one is ``anyres_max_9``; 4 makes
    the tiny canvases downsample). Tiles are ``image_size`` pixels, ``(image_size /
    patch_size)**2`` tokens.
    """
    import transformers

    ov = family == "llava_onevision"
    text = text or ("qwen2" if ov else "llama")
    tower = tower or ("siglip" if ov else "clip")
    kw = dict(text_config=decoder_text_config(text, ids=ids, **text_kw),
              vision_config=vision_tower_config(tower, image_size=image_size, patch_size=patch_size,
                                                hidden=vision_hidden, depth=vision_depth),
              image_token_index=ids["image"], projector_hidden_act="gelu",
              vision_feature_select_strategy=strategy or ("full" if ov else "default"),
              vision_feature_layer=feature_layer if feature_layer is not None else (-1 if ov else -2),
              tie_word_embeddings=tie)
    if family == "llava":
        return transformers.LlavaConfig(**kw, image_seq_length=(image_size // patch_size) ** 2)
    kw["image_grid_pinpoints"] = [list(p) for p in (pinpoints or (LLAVA_ONEVISION_PINPOINTS if ov
                                                                   else LLAVA_NEXT_PINPOINTS))]
    if family == "llava_next":
        return transformers.LlavaNextConfig(**kw)
    if ov:
        return transformers.LlavaOnevisionConfig(**kw, vision_aspect_ratio=aspect, video_token_index=ids["video"])
    raise ValueError(f"unknown LLaVA family {family!r}")


def llava_prompt(segments: list, tokens_per_image: list[int], *, ids=LLAVA_IDS, vocab: int = 256,
                 bos: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[1, pos]``: ``segments`` of ints (random text tokens) and ``"image"``
    (the next count of ``tokens_per_image`` ``<image>`` placeholders, no separators, as
    LLaVA's processor expands them). A BOS is prepended when ``bos``."""
    toks: list[int] = [ids["bos"]] if bos else []
    special = set(ids.values())
    pool = torch.tensor([i for i in range(3, min(vocab, 250)) if i not in special])
    counts = iter(tokens_per_image)
    for seg in segments:
        if isinstance(seg, int):
            toks += pool[torch.randint(len(pool), (seg,), generator=generator)].tolist()
        elif seg == "image":
            toks += [ids["image"]] * next(counts)
        else:
            raise ValueError(f"a segment is an int or 'image', got {seg!r}")
    return torch.tensor([toks], dtype=torch.long)
