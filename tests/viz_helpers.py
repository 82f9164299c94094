"""Shared pieces of the viz tests: tiny models whose text queries are forced (by a hook
editing ``hook_pattern``) to attend one chosen image cell, and synthetic images with a
bright square at a known cell."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mechvlm import HookedVLM


def force_text_to_cell(model: HookedVLM, batch: dict, layer: int, image: int, cell: tuple[int, int]):
    """Run with a hook that makes every text query of ``layer`` put all its attention on
    image ``image``'s token at merged-grid ``cell``; returns ``(roles, cache, target_pos)``."""
    roles = model.roles(**batch)
    hit = (roles.image_index[0] == image) & (roles.grid_row[0] == cell[0]) & (roles.grid_col[0] == cell[1])
    (target,) = torch.nonzero(hit)[:, 0].tolist()
    text = roles.text[0]

    def edit(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, text, :] = 0.0
        pattern[:, :, text, target] = 1.0
        return pattern

    name = f"blocks.{layer}.attn.hook_pattern"
    with model.hooks(fwd_hooks=[(name, edit)]):
        _, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith("hook_pattern"))
    return roles, cache, target


def image_with_square(width: int, height: int, grid_hw: tuple[int, int], cell: tuple[int, int],
                      margin: float = 0.25, seed: int = 0):
    """A dark, mildly noisy RGB image with a white square inside grid ``cell`` (the grid
    laid evenly over the image); returns ``(PIL image, (x0, y0, x1, y1))`` of the square
    in the image's own pixels, as fractions of the width / height."""
    h, w = grid_hw
    r, c = cell
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    fx0, fx1 = (c + margin) / w, (c + 1 - margin) / w
    fy0, fy1 = (r + margin) / h, (r + 1 - margin) / h
    arr[int(round(fy0 * height)):int(round(fy1 * height)), int(round(fx0 * width)):int(round(fx1 * width))] = 255
    return Image.fromarray(arr), (fx0, fy0, fx1, fy1)
