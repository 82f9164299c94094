"""The baseline an image key/value pair is replaced with: its mean over a reference set.

`image_kv_means` averages the pre-RoPE keys (``hook_k``) and the values (``hook_v``) of
the image tokens of reference batches, per layer, KV head and grid cell (``per_cell``; all
images must then share one grid) or pooled over every image token. `place_baseline` puts
the means on the image positions of a batch, optionally rotated by the model's RoPE at
those positions (what a post-RoPE key edit needs), as ``[batch, pos, kv_head, d_head]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechvlm.analyses.image_kv import image_kv_batches
from mechvlm.components.rotary import apply_rotary
from mechvlm.image_layout import check_one_grid_images
from mechvlm.metrics._common import Batch


@dataclass
class ImageKVBaseline:
    """Per layer ``[cells, kv_head, d_head]`` mean pre-RoPE keys and values (``cells = 1``
    when pooled); ``grid`` the ``(t, h, w)`` the cells index, None when pooled."""

    key: dict[int, Tensor]
    value: dict[int, Tensor]
    grid: tuple[int, int, int] | None
    n_images: int

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "grid": self.grid, "n_images": self.n_images}


def image_kv_means(model, batches: Batch | Iterable[Batch], layers=None, *, per_cell: bool = True,
                   progress: bool = True) -> ImageKVBaseline:
    """Mean image keys (pre-RoPE) and values over the reference ``batches`` (streamed)."""
    sums: dict[str, Tensor] = {}
    grid, n_images, n_tokens, layer_list = None, 0, 0, None
    for part in image_kv_batches(model, batches, layers, kinds=("key_pre", "value"), vision=False,
                                 dtype=torch.float64, progress=progress):
        layer_list = part.layers
        if part.n_images == 0:
            continue
        grids = {tuple(g) for g in part.image_grid.tolist()}
        if per_cell:
            if grid is None:
                grid = next(iter(grids))
            if grids != {grid}:
                raise ValueError(f"per-cell means need one grid for every image, got {sorted(grids | {grid})}; "
                                 "pass per_cell=False for means pooled over the image tokens")
        for name, t in part.features.items():
            s = t.view(part.n_images, -1, *t.shape[1:]).sum(0) if per_cell else t.sum(0, keepdim=True)
            sums[name] = sums.get(name, 0) + s
        n_images += part.n_images
        n_tokens += int(part.image_grid.prod(-1).sum())
    if n_images == 0:
        raise ValueError("the reference batches hold no image")
    count = n_images if per_cell else n_tokens
    mean = {n: (s / count).to(model.dtype) for n, s in sums.items()}
    return ImageKVBaseline(key={l: mean[f"key_pre.{l}"] for l in layer_list},
                           value={l: mean[f"value.{l}"] for l in layer_list},
                           grid=grid if per_cell else None, n_images=n_images)


def rope_tables(model, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer_type: (cos, sin)}`` ``[batch, pos, d_head]`` as the model's forward builds them."""
    inputs = model.prepare_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"),
                                  batch.get("attention_mask"), batch.get("token_type_ids"))
    rot = model.family.rotary(model.cfg)
    return {t: rot[t](inputs.position_ids, model.dtype) for t in set(model.cfg.layer_types)}


def place_baseline(model, baseline: ImageKVBaseline, batch: Batch, *, rotate: bool
                   ) -> tuple[dict[int, Float[Tensor, "batch pos kv d"]], dict[int, Float[Tensor, "batch pos kv d"]]]:
    """The means on the image positions of ``batch`` (zeros elsewhere): ``(keys, values)``
    per layer; keys rotated by RoPE at those positions when ``rotate``."""
    roles = model.roles(**batch)
    check_one_grid_images(roles.spans, "place_baseline")
    image = roles.image
    b, n = image.shape
    if baseline.grid is not None:
        t, h, w = baseline.grid
        bad = [s.image for s in roles.spans if tuple(s.grid) != (t, h, w)]
        if bad:
            raise ValueError(f"images {bad} do not have the baseline's grid {baseline.grid}")
        cell = (roles.grid_t * h * w + roles.grid_row * w + roles.grid_col).clamp_min(0)
    else:
        cell = torch.zeros(b, n, dtype=torch.long, device=image.device)
    tables = rope_tables(model, batch) if rotate else None
    keys, values = {}, {}
    for l in baseline.key:
        for src, dst in ((baseline.key[l], keys), (baseline.value[l], values)):
            placed = src.to(model.device)[cell.to(model.device)] * image.to(model.device)[..., None, None]
            dst[l] = placed
        if rotate:
            cos, sin = tables[model.cfg.layer_types[l]]
            keys[l] = apply_rotary(keys[l], cos, sin)
    return keys, values
