"""The image tokens' keys and values inside the language model (METHODS §9; seed 002).

`image_kv` runs the model over batches and keeps, per layer, the keys and values of every
image token, per KV head, on the image's merged token grid, plus the vision encoder's
output for the same tokens (the "SigLIP-equivalent" baseline of seed 002: the features the
language model receives). Nothing else is cached: a hook per layer gathers the image
positions of ``hook_rot_k`` / ``hook_v`` (and ``hook_k`` on request) and drops the rest.

Layout of a feature table: ``[n_tokens, heads, d]`` over all image tokens of all images,
image after image in feature order (batch row by row, left to right), each image's tokens
row-major over its merged grid; `ImageKV.grid` / `ImageKV.stack` give ``[h, w, kv_head,
d_head]`` / ``[image, h, w, kv_head, d_head]``. With ``out_dir`` the tables are written as
safetensors shards instead of being held (`mechvlm.analyses.kv_store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.image_layout import check_one_grid_images
from mechvlm.metrics._common import Batch, FwdHooks, iter_batches, run_forward, select_layers, user_hooks

#: what `image_kv` can record: post-RoPE keys, values, pre-RoPE keys (``hook_rot_k``,
#: ``hook_v``, ``hook_k``), per layer; ``"vision"`` is the layer-less vision-encoder output.
KV_KINDS = ("key", "value", "key_pre")
_HOOK_OF = {"key": "attn.hook_rot_k", "value": "attn.hook_v", "key_pre": "attn.hook_k"}
VISION = "vision"


def feature_name(kind: str, layer: int | None = None) -> str:
    """The table name of a kind at a layer: ``"key.3"``; ``"vision"`` for the encoder output."""
    if kind == VISION:
        return VISION
    if kind not in KV_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; known: {KV_KINDS + (VISION,)}")
    if layer is None:
        raise ValueError(f"feature kind {kind!r} needs a layer")
    return f"{kind}.{int(layer)}"


@dataclass
class ImageKV:
    """Image-token features of a set of images.

    Attributes:
        features: ``{name: [n_tokens, heads, d]}``; names from `feature_name` (``"key.3"``:
            post-RoPE keys of layer 3, ``[n_tokens, kv_head, d_head]``; ``"vision"``:
            ``[n_tokens, 1, d_model]``).
        image_example: ``[image]`` the example (batch row counted over all batches) of each image.
        image_slot: ``[image]`` the image's index among its example's images.
        image_grid: ``[image, 3]`` its merged grid ``(t, h, w)``.
        image_offset: ``[image]`` its first row in the feature tables.
        layers, kinds: what was recorded.
    """

    features: dict[str, Tensor]
    image_example: Int[Tensor, " image"]
    image_slot: Int[Tensor, " image"]
    image_grid: Int[Tensor, "image 3"]
    image_offset: Int[Tensor, " image"]
    layers: list[int]
    kinds: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.image_grid.shape[0])

    def tokens(self, kind: str, layer: int | None = None) -> Float[Tensor, "token heads d"]:
        name = feature_name(kind, layer)
        if name not in self.features:
            raise KeyError(f"no {name!r} recorded (kinds {self.kinds}, layers {self.layers})")
        return self.features[name]

    def grid(self, kind: str, layer: int | None, image: int) -> Float[Tensor, "h w heads d"]:
        """One image's features on its merged grid ``[h, w, heads, d]``."""
        t, h, w = self.image_grid[image].tolist()
        if t != 1:
            raise ValueError(f"image {image} has t={t} frames; only still images have a 2-D grid")
        o = int(self.image_offset[image])
        feats = self.tokens(kind, layer)[o:o + h * w]
        return feats.reshape(h, w, *feats.shape[1:])

    def stack(self, kind: str, layer: int | None, images: Sequence[int] | None = None
              ) -> Float[Tensor, "image h w heads d"]:
        """``[image, h, w, heads, d]`` for images that share one grid (error otherwise)."""
        images = list(range(self.n_images)) if images is None else list(images)
        grids = {tuple(self.image_grid[i].tolist()) for i in images}
        if len(grids) != 1:
            raise ValueError(f"the images have different grids {sorted(grids)}; use grid() per image "
                             "or pass images= with one grid")
        return torch.stack([self.grid(kind, layer, i) for i in images])

    def to_dict(self) -> dict:
        return {"features": self.features, "image_example": self.image_example, "image_slot": self.image_slot,
                "image_grid": self.image_grid, "image_offset": self.image_offset, "layers": self.layers,
                "kinds": self.kinds, "meta": self.meta}

    @classmethod
    def concat(cls, parts: Sequence["ImageKV"]) -> "ImageKV":
        """Images of several results (same layers and kinds) one after the other."""
        if not parts:
            raise ValueError("nothing to concatenate")
        sizes = [int(p.image_grid.prod(-1).sum()) for p in parts]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        return cls(
            features={n: torch.cat([p.features[n] for p in parts]) for n in parts[0].features},
            image_example=torch.cat([p.image_example for p in parts]),
            image_slot=torch.cat([p.image_slot for p in parts]),
            image_grid=torch.cat([p.image_grid for p in parts]),
            image_offset=torch.cat([p.image_offset + s for p, s in zip(parts, starts.tolist())]),
            layers=list(parts[0].layers), kinds=list(parts[0].kinds), meta=dict(parts[0].meta))


def _image_meta(roles, n_seen: int) -> tuple[Tensor, Tensor, Tensor]:
    example, slot, grid, per_row = [], [], [], {}
    for s in roles.spans:
        example.append(n_seen + s.row)
        slot.append(per_row.get(s.row, 0))
        per_row[s.row] = slot[-1] + 1
        grid.append(list(s.grid))
    return (torch.tensor(example, dtype=torch.long), torch.tensor(slot, dtype=torch.long),
            torch.tensor(grid, dtype=torch.long).reshape(-1, 3))


def _empty(model, name: str, dtype) -> Tensor:
    """The table of a batch without images."""
    heads, d = (1, model.cfg.d_model) if name == VISION else (model.cfg.n_kv_heads, model.cfg.d_head)
    return torch.zeros(0, heads, d, dtype=dtype)


def image_kv_batches(model, batches: Batch | Iterable[Batch], layers: Iterable[int] | int | None = None, *,
                     kinds: Sequence[str] = ("key", "value"), vision: bool = True, dtype: torch.dtype | None = None,
                     fwd_hooks: FwdHooks = None, progress: bool = True, skip: int = 0):
    """Yield one `ImageKV` per batch (the generator behind `image_kv`); ``skip`` batches
    are passed over without running the model (to resume a sharded run)."""
    layer_list = select_layers(model, layers)
    for k in kinds:
        feature_name(k, 0)
    dtype = dtype or model.dtype
    n_seen = 0
    with torch.no_grad():
        for i, batch in enumerate(iter_batches(batches, progress, "image_kv")):
            rows = int(batch["input_ids"].shape[0])
            if i < skip:
                n_seen += rows
                continue
            roles = model.roles(**batch)
            check_one_grid_images(roles.spans, "image_kv")
            image = roles.image.to(model.device)
            got: dict[str, Tensor] = {}

            def grab(name):
                def hook(act: Tensor, hook) -> None:
                    got[name] = act[image].to("cpu", dtype)

                return hook

            hooks = user_hooks(fwd_hooks, batch, roles)
            hooks += [(f"blocks.{l}.{_HOOK_OF[k]}", grab(feature_name(k, l))) for l in layer_list for k in kinds]
            if vision and roles.spans:
                hooks.append(("hook_image_embeds", lambda act, hook: got.__setitem__(
                    VISION, act.to("cpu", dtype)[:, None])))
            run_forward(model, batch, hooks)
            example, slot, grid = _image_meta(roles, n_seen)
            sizes = grid.prod(-1)
            offset = torch.cumsum(sizes, 0) - sizes
            names = [feature_name(k, l) for l in layer_list for k in kinds] + ([VISION] if vision else [])
            yield ImageKV(features={n: got.get(n, _empty(model, n, dtype)) for n in names}, image_example=example,
                          image_slot=slot, image_grid=grid, image_offset=offset, layers=layer_list,
                          kinds=list(kinds) + ([VISION] if vision else []))
            n_seen += rows


def image_kv(model, batches: Batch | Iterable[Batch], layers: Iterable[int] | int | None = None, *,
             kinds: Sequence[str] = ("key", "value"), vision: bool = True, dtype: torch.dtype | None = None,
             fwd_hooks: FwdHooks = None, progress: bool = True, out_dir: str | Path | None = None,
             shard_tokens: int = 65536, overwrite: bool = False, resume: bool = False):
    """Keys / values of the image tokens per layer and KV head (METHODS §9).

    Args:
        model: a `HookedVLM`.
        batches: one batch dict (``model(**batch)`` keyword arguments) or an iterable of them;
            any number of images per row (each image is recorded on its own grid).
        layers: layer indices (default all).
        kinds: any of ``"key"`` (post-RoPE, ``hook_rot_k``), ``"value"`` (``hook_v``) and
            ``"key_pre"`` (pre-RoPE, ``hook_k``; after Gemma3's ``k_norm``), each
            ``[n_tokens, kv_head, d_head]``.
        vision: also keep ``hook_image_embeds`` (the vision encoder + projector output).
        dtype: storage dtype (default the model's).
        fwd_hooks: interventions to run with (as in the metrics).
        out_dir: stream to safetensors shards there (see `kv_store.ImageKVStore`) instead of
            returning everything in memory; a shard is written when it holds
            ``shard_tokens`` image tokens. ``resume`` continues an interrupted run (the same
            batches in the same order); ``overwrite`` replaces a finished or partial one.

    Returns:
        `ImageKV` in memory, or, with ``out_dir``, the `ImageKVStore` of the shards.
    """
    meta = {"model_type": model.cfg.model_type, "n_kv_heads": model.cfg.n_kv_heads, "d_head": model.cfg.d_head}
    if out_dir is None:
        parts = list(image_kv_batches(model, batches, layers, kinds=kinds, vision=vision, dtype=dtype,
                                      fwd_hooks=fwd_hooks, progress=progress))
        if not parts:
            raise ValueError("no batches given")
        out = ImageKV.concat(parts)
        out.meta = meta
        return out
    from mechvlm.analyses.kv_store import write_shards

    return write_shards(out_dir, lambda skip: image_kv_batches(
        model, batches, layers, kinds=kinds, vision=vision, dtype=dtype, fwd_hooks=fwd_hooks,
        progress=progress, skip=skip), meta=meta, shard_tokens=shard_tokens, overwrite=overwrite,
        resume=resume)
