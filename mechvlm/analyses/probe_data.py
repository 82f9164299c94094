"""Ground truth for the probes of seed 002: a small Dataset protocol, its mapping from
pixels onto a model's merged token grid, and the toy datasets built from `mechvlm.toy`.

A real dataset plugs in as any sequence of objects with these attributes:

* segmentation (`SegmentationSample`): ``image`` (PIL image or uint8 ``[H, W, 3]``) and
  ``mask`` (bool ``[H, W]``, True on the object);
* correspondence (`CorrespondenceSample`): ``image_a``, ``image_b`` and ``points_a``,
  ``points_b`` (float ``[K, 2]`` pixel ``(x, y)`` of corresponding keypoints);
* referring expressions (`ReferringSample`): ``image``, ``prompt`` (the text, holding the
  expression), ``query_token`` (the token of the prompt whose query is matched against
  the image keys, as the tokenizer writes it) and ``mask`` (bool ``[H, W]`` of the
  referred object; its bounding box on the token grid is what a hit must fall in).

The processors of both families resize the whole image (no crop), so pixel ``(x, y)`` of
an ``H x W`` image lies in token cell ``(floor(y / H * h), floor(x / W * w))`` of the
``h x w`` merged grid; a mask becomes the fraction of each cell it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@runtime_checkable
class SegmentationSample(Protocol):
    image: Any
    mask: np.ndarray


@runtime_checkable
class CorrespondenceSample(Protocol):
    image_a: Any
    image_b: Any
    points_a: np.ndarray
    points_b: np.ndarray


@runtime_checkable
class ReferringSample(Protocol):
    image: Any
    prompt: str
    query_token: str
    mask: np.ndarray


def _check(sample, proto, i: int) -> None:
    if not isinstance(sample, proto):
        need = [a for a in proto.__annotations__ if not hasattr(sample, a)]
        raise TypeError(f"sample {i} ({type(sample).__name__}) is not a {proto.__name__}: it lacks {need}")


def check_samples(samples, proto) -> list:
    samples = list(samples)
    if not samples:
        raise ValueError(f"no {proto.__name__} samples given")
    for i, s in enumerate(samples):
        _check(s, proto, i)
    return samples


def pil(image):
    """A PIL image from a PIL image or a uint8 ``[H, W, 3]`` array."""
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def grid_coverage(mask: np.ndarray | Tensor, h: int, w: int) -> Float[Tensor, "h w"]:
    """Fraction of each cell of an ``h x w`` grid covered by a bool ``[H, W]`` pixel mask
    (exact area fractions, also when ``H``, ``W`` are not multiples of ``h``, ``w``)."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {tuple(m.shape)}")
    H, W = m.shape

    def weights(n_px: int, n_cells: int) -> Tensor:  # [cells, px]: overlap of pixel p with cell c
        edges = torch.arange(n_cells + 1, dtype=torch.float64) * n_px / n_cells
        lo, hi = torch.arange(n_px, dtype=torch.float64), torch.arange(1, n_px + 1, dtype=torch.float64)
        return (torch.minimum(hi[None], edges[1:, None]) - torch.maximum(lo[None], edges[:-1, None])).clamp_min(0)

    wy, wx = weights(H, h), weights(W, w)
    return (wy @ m @ wx.T) / (wy.sum(1)[:, None] * wx.sum(1)[None])


def grid_mask(mask: np.ndarray | Tensor, h: int, w: int, threshold: float = 0.5) -> Bool[Tensor, "h w"]:
    """Cells covered at least ``threshold`` (``0``: any overlap)."""
    cov = grid_coverage(mask, h, w)
    return cov > 0 if threshold == 0 else cov >= threshold


def grid_box(mask: np.ndarray | Tensor, h: int, w: int) -> Bool[Tensor, "h w"]:
    """The bounding box on the grid of every cell the mask touches."""
    cells = grid_mask(mask, h, w, 0.0)
    out = torch.zeros(h, w, dtype=torch.bool)
    if cells.any():
        rows, cols = cells.nonzero(as_tuple=True)
        out[int(rows.min()):int(rows.max()) + 1, int(cols.min()):int(cols.max()) + 1] = True
    return out


def grid_points(points: np.ndarray | Tensor, size: tuple[int, int], h: int, w: int) -> Int[Tensor, "k 2"]:
    """Pixel ``(x, y)`` points of an image of ``size = (W, H)`` -> ``(row, col)`` cells."""
    p = torch.as_tensor(np.asarray(points), dtype=torch.float64).reshape(-1, 2)
    W, H = size
    rows = (p[:, 1] / H * h).floor().clamp(0, h - 1)
    cols = (p[:, 0] / W * w).floor().clamp(0, w - 1)
    return torch.stack([rows, cols], 1).long()


def image_size(image) -> tuple[int, int]:
    """``(W, H)`` of a PIL image or an ``[H, W, 3]`` array."""
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        return tuple(image.size)
    a = np.asarray(image)
    return a.shape[1], a.shape[0]


# ----------------------------------------------------------------------------- toys --
@dataclass
class Segmentation:
    image: Any
    mask: np.ndarray


@dataclass
class Correspondence:
    image_a: Any
    image_b: Any
    points_a: np.ndarray
    points_b: np.ndarray


@dataclass
class Referring:
    image: Any
    prompt: str
    query_token: str
    mask: np.ndarray


def toy_segmentation(n: int, seed: int = 0) -> list[Segmentation]:
    """One shape per image (`mechvlm.toy.probe_scenes.segmentation_scenes`)."""
    from mechvlm.toy.probe_scenes import segmentation_scenes

    return [Segmentation(s.image, s.object_mask) for s in segmentation_scenes(n, seed)]


def toy_correspondence(n: int, seed: int = 0) -> list[Correspondence]:
    """The same shape moved by whole token cells; keypoints at the object cells' centres."""
    from mechvlm.toy.probe_scenes import moved_pairs

    return [Correspondence(p.a.image, p.b.image, p.points("a"), p.points("b")) for p in moved_pairs(n, seed)]


def toy_referring(n: int, seed: int = 0) -> list[Referring]:
    """Two shapes of different colours; the option-line token of one colour refers to it."""
    from mechvlm.toy.probe_scenes import referring_scenes

    return [Referring(r.scene.image, r.prompt, r.query_token, r.target_mask) for r in referring_scenes(n, seed)]
