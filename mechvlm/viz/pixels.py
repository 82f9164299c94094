"""Pixel-level pieces of the image overlays: images as uint8 arrays, resized to a token
grid's pixel size, grids upsampled to pixels, and the composited heat map (the numpy
versions of what `mechvlm.viz.image.attention_on_image` draws)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["resize_to_grid", "heat_pixels", "overlay"]


def _center_square(image):
    arr = _as_array(image)
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top:top + side, left:left + side]


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):  # CHW
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return arr


def resize_to_grid(image, size: tuple[int, int]) -> np.ndarray:
    """The image (PIL, ``[H, W, C]`` / ``[C, H, W]`` array or tensor, uint8 or floats in
    [0, 1]) resized (bicubic, no crop) to ``size = (height, width)``: uint8 ``[H, W, 3]``."""
    from PIL import Image

    arr = _as_array(image)
    if arr.shape[:2] == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BICUBIC))


def heat_pixels(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of an ``[h, w]`` grid to ``size = (H, W)`` pixels: pixel ``(y, x)``
    takes cell ``(y*h // H, x*w // W)`` (the same cells `attention_on_image` draws)."""
    h, w = grid.shape
    H, W = size
    return grid[(np.arange(H) * h // H)[:, None], (np.arange(W) * w // W)[None, :]]


def overlay(image: np.ndarray | None, grid: np.ndarray, *, size: tuple[int, int] | None = None,
            cmap: str = "inferno", alpha: float = 0.55, vmin: float = 0.0,
            vmax: float | None = None) -> np.ndarray:
    """The composited picture ``(1 - alpha) * image + alpha * cmap(heat)``: uint8
    ``[H, W, 3]`` (``image`` None: the heat alone on black)."""
    import matplotlib

    if image is not None:
        base = resize_to_grid(image, size) if size is not None else _as_array(image)
    else:
        base = np.zeros((*(size or (grid.shape[0] * 28, grid.shape[1] * 28)), 3), np.uint8)
    heat = heat_pixels(grid, base.shape[:2])
    vmax = float(grid.max()) if vmax is None else vmax
    norm = np.clip((heat - vmin) / ((vmax - vmin) or 1.0), 0, 1)
    rgb = matplotlib.colormaps[cmap](norm)[..., :3]
    out = (1 - alpha) * base / 255.0 + alpha * rgb
    return (out * 255).round().astype(np.uint8)
