"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's mapping plus the anyres
input layout.

Anyres (transformers 5.23, ``LlavaNextModel.pack_image_features``): the processor picks the
best of ``image_grid_pinpoints`` for the original ``image_sizes[i] = (height, width)``,
cuts the resized, padded image into ``nph x npw`` tiles of the tower's size and prepends
the whole image squashed to one tile. The features of image ``i`` are, in order:

    * the overview: one ``n x n`` grid (``n = image_size / patch_size``), row-major;
    * the tiles stitched into one ``nph*n x npw*n`` canvas, cropped by ``unpad_image`` to
      the original aspect ratio (the rows / columns of the padding removed), each of its
      rows followed by the learned ``image_newline`` vector.

mechvlm derives this layout from ``image_sizes`` alone, with HF's own
``get_anyres_image_grid_shape`` and ``unpad_image`` (applied to an index grid, which also
gives the crop offset), and the features from HF's ``get_image_features``. Roles: every
token is ``image``; the newline tokens are also ``newline``; ``grid_tile`` is 0 on the
overview and ``1 + tile_row * npw + tile_col`` on the tiles (the order of the tiles in
``pixel_values[i]``), ``grid_row`` / ``grid_col`` within the tile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mechvlm.config import VLMConfig
from mechvlm.image_layout import GridView, ImageLayout, ImageSpan, TileMap
from mechvlm.models.base import register_family
from mechvlm.models.llava import LlavaFamily, tower_geometry


def anyres_layout(cfg: VLMConfig, image_size: tuple[int, int], *, patched: bool = True,
                  max_patches: int | None = None) -> ImageLayout:
    """The token layout of one image of original ``(height, width)`` = ``image_size``.

    ``patched=False`` (OneVision, rows with several images): the overview and one newline.
    ``max_patches`` (OneVision's ``anyres_max_N``): when the cropped canvas holds more than
    about N tiles (``ratio = sqrt(cells / (N n^2)) > 1.1``) HF downsamples it bilinearly
    to ``(int(rows // ratio), int(cols // ratio))``; each token's tile cell is then the
    canvas cell under its centre.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    n = cfg.extra["tile_side"]
    base = GridView(0, (1, n, n), name="base")
    if not patched:
        return ImageLayout(n * n + 1, (1, n, n), (base, GridView(n * n, (1, 1, 0), newline=True, name="newline")))
    size = [int(v) for v in image_size]
    nph, npw = get_anyres_image_grid_shape(size, cfg.extra["image_grid_pinpoints"], cfg.extra["tile_pixels"])
    height, width = nph * n, npw * n
    kept = unpad_image(torch.arange(height * width).view(1, height, width), size)
    rows, cols = kept.shape[1:]
    top, left = divmod(int(kept[0, 0, 0]), width)
    out_rows, out_cols, scale = rows, cols, (1.0, 1.0)
    if max_patches is not None:
        ratio = math.sqrt(rows * cols / (max_patches * n**2))
        if ratio > 1.1:
            out_rows, out_cols = int(rows // ratio), int(cols // ratio)
            scale = (rows / out_rows, cols / out_cols)
    tiles = GridView(n * n, (1, out_rows, out_cols), newline=True, name="tiles",
                     tiles=TileMap((nph, npw), (n, n), (top, left), scale))
    return ImageLayout(n * n + out_rows * (out_cols + 1), (1, n, n), (base, tiles))


def num_tiles(cfg: VLMConfig, image_size: tuple[int, int]) -> int:
    """Tiles of one patched image, the overview included (HF's ``image_size_to_num_patches``)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches([int(v) for v in image_size], cfg.extra["image_grid_pinpoints"],
                                     cfg.extra["tile_pixels"])


def _sizes(image_sizes, n_image_tokens: int, token_id: int) -> list[tuple[int, int]]:
    if image_sizes is None:
        if n_image_tokens:
            raise ValueError(f"input_ids contain {n_image_tokens} image tokens (id {token_id}) but image_sizes "
                             "is None: pass the image_sizes [n_images, 2] (original height, width) the "
                             "processor returns")
        return []
    sizes = torch.as_tensor(image_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be [n_images, 2] (height, width), got {tuple(sizes.shape)}")
    return [tuple(s) for s in sizes.tolist()]


class LlavaNextFamily(LlavaFamily):
    model_type = "llava_next"
    hf_class_name = "LlavaNextForConditionalGeneration"
    name = "LLaVA-NeXT"
    visual_inputs = ("image_sizes",)

    def layout_config(self, hf_config) -> dict:
        if tower_geometry(hf_config)["cls"]:
            raise NotImplementedError(f"{self.name} with vision_feature_select_strategy='full' on a CLIP tower "
                                      "(HF cannot pack its tiles either) is not supported")
        return {"image_grid_pinpoints": [list(p) for p in hf_config.image_grid_pinpoints], "image_newline": True}

    def patched(self, cfg: VLMConfig, n_images: int, **visual) -> list[bool]:
        """Whether each image is tiled (always, in LLaVA-NeXT)."""
        return [True] * n_images

    def image_layouts(self, cfg: VLMConfig, input_ids: Tensor, image_cells=None, **visual) -> list[ImageLayout]:
        sizes = _sizes(visual.get("image_sizes"), int((input_ids == cfg.image_token_id).sum()), cfg.image_token_id)
        patched = self.patched(cfg, len(sizes), **visual)
        return [anyres_layout(cfg, s, patched=p, max_patches=cfg.extra.get("max_patches"))
                for s, p in zip(sizes, patched)]

    def check_pixels(self, cfg: VLMConfig, pixel_values: Tensor, spans: list[ImageSpan], **visual) -> None:
        sizes = _sizes(visual.get("image_sizes"), 1, cfg.image_token_id)
        if len(sizes) != len(spans):
            raise ValueError(f"image_sizes has {len(sizes)} rows but input_ids hold {len(spans)} image(s)")
        patched = self.patched(cfg, len(sizes), **visual)
        tiles = [num_tiles(cfg, s) if p else 1 for s, p in zip(sizes, patched)]
        px = cfg.extra["tile_pixels"]
        if pixel_values.ndim == 5 and tuple(pixel_values.shape[2:]) == (3, px, px):
            if pixel_values.shape[0] != len(spans) or pixel_values.shape[1] < max(tiles):
                raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must hold {len(spans)} image(s) of up "
                                 f"to {max(tiles)} tiles (tiles per image from image_sizes: {tiles})")
        elif pixel_values.ndim == 4 and tuple(pixel_values.shape[1:]) == (3, px, px):
            if pixel_values.shape[0] != sum(tiles):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tiles but image_sizes give "
                                 f"{sum(tiles)} ({tiles})")
        else:
            raise ValueError(f"pixel_values must be [n_images, max_tiles, 3, {px}, {px}] or "
                             f"[n_tiles, 3, {px}, {px}], got {tuple(pixel_values.shape)}")


LLAVA_NEXT = register_family(LlavaNextFamily())
