"""The argument forms `HookedVLM.forward` accepts, reduced to its keyword form.

    model(input_ids, pixel_values, image_grid_thw, attention_mask, ...)   # keyword form
    model(batch)            # a dict / BatchFeature: to_inputs(...), InputBuilder, an HF processor
    model("text")           # str or list of str: to_tokens (TL)
    model(resid, start_at_layer=l, tokens=ids_or_batch)                   # TL's form
    model(ids_or_batch, start_at_layer=l, resid=resid)                     # the same, by keyword

`transformer_lens.patching`, the head detector and `SVDInterpreter` pass the tokens (or a
batch mapping, for images) as the first positional argument.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


_ROW_KEYS = ("input_ids", "attention_mask", "target_mask", "token_type_ids", "batch_num_images")
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_embeds")


class VLMBatch(dict):
    """The batch dict ``to_inputs`` returns (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...), usable where TransformerLens code expects a tokens tensor:
    ``shape`` is ``input_ids.shape`` (TL's ``patching`` reads ``corrupted_tokens.shape``),
    ``len()`` is the batch size, and ``batch[rows]`` (a slice or a list of row indices)
    selects rows together with their images (pixels, grids, precomputed image features).
    String keys work as for any dict.

    ``image_token_id``: the image placeholder id (set by ``to_inputs``); row selection needs it.
    """

    def __init__(self, *args, image_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_token_id = image_token_id

    @property
    def shape(self) -> torch.Size:
        return self["input_ids"].shape

    def __len__(self) -> int:
        return self["input_ids"].shape[0]

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.select_rows(key)

    def to(self, device) -> "VLMBatch":
        return VLMBatch({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()},
                        image_token_id=self.image_token_id)

    def select_rows(self, rows: slice | list[int] | Tensor) -> "VLMBatch":
        """The rows ``rows`` (a slice or index list) with the images they hold."""
        ids = self["input_ids"]
        if isinstance(rows, int):
            raise TypeError("index a VLMBatch with a slice or a list (batch[i:i + 1]), not an int")
        keep = torch.arange(ids.shape[0])[rows].reshape(-1).tolist()
        if any(k in self for k in _VIDEO_KEYS):
            raise NotImplementedError("selecting rows of a batch with videos is not supported; build the "
                                      "batch of those rows instead")
        out = {k: v[keep] for k, v in self.items() if k in _ROW_KEYS}
        if "pixel_values" in self or "image_embeds" in self:
            if self.image_token_id is None:
                raise ValueError("this VLMBatch has images but no image_token_id: cannot select rows")
            is_img = (ids == self.image_token_id).cpu()
            starts = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
            owner = torch.repeat_interleave(torch.arange(ids.shape[0]), starts.sum(1))  # row of each image
            tokens_per_image = [len(r) for r in torch.tensor_split(is_img.flatten().nonzero()[:, 0],
                                                                   starts.flatten().nonzero()[1:, 0].tolist())] \
                if starts.any() else []
            chosen = [i for r in keep for i in (owner == r).nonzero()[:, 0].tolist()]
            grid = self.get("image_grid_thw")
            n_images = len(grid) if grid is not None else len(self["pixel_values"]) if "pixel_values" in self else None
            if n_images is not None and n_images != len(owner):
                raise ValueError(f"the batch has {len(owner)} runs of image tokens but {n_images} images (images "
                                 "written back to back, as LLaVA allows?): cannot tell which row owns which image")
            if "image_sizes" in self:  # LLaVA-NeXT / OneVision: one (height, width) per image
                out["image_sizes"] = self["image_sizes"][chosen]
            if grid is not None:
                out["image_grid_thw"] = grid[chosen]
            if "pixel_values" in self:
                pv = self["pixel_values"]
                if grid is not None:  # Qwen2.5-VL: t*h*w patch rows per image
                    parts = pv.split(grid.prod(-1).tolist())
                    out["pixel_values"] = torch.cat([parts[i] for i in chosen]) if chosen else pv[:0]
                else:
                    out["pixel_values"] = pv[chosen]
            if "image_embeds" in self:
                parts = self["image_embeds"].split(tokens_per_image)
                out["image_embeds"] = torch.cat([parts[i] for i in chosen]) if chosen else self["image_embeds"][:0]
        return VLMBatch(out, image_token_id=self.image_token_id)

# keys of HF processor outputs that mechvlm derives itself from input_ids
_DERIVED_KEYS = ("mm_token_type_ids",)
# the batch keys a mapping may set, and forward's keywords they fill
_BATCH_KEYS = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask", "token_type_ids",
               "target_mask", "image_embeds")


def merge_batch(params: dict, batch: Mapping) -> dict:
    """``params`` (forward's arguments) with the tensors of ``batch`` filled in; a key given
    both in the batch and explicitly raises."""
    out = dict(params)
    out["input_ids"] = None
    for key, value in batch.items():
        if key in _DERIVED_KEYS:
            continue
        if key not in out:
            raise TypeError(f"the batch has a key {key!r} that HookedVLM.forward does not take")
        if out[key] is not None and key != "input_ids":
            raise TypeError(f"{key!r} is given both in the batch and as an argument")
        out[key] = value
    if out["input_ids"] is None:
        raise ValueError("the batch has no 'input_ids'")
    return out


def forward_arguments(model, params: dict) -> dict:
    """Reduce any accepted form of ``forward``'s arguments to the keyword form with an integer
    ``input_ids`` tensor (and the residual, if any, in ``resid``)."""
    p = dict(params)
    if p.get("tokens") is not None:
        if p.get("start_at_layer") is None:
            raise ValueError("tokens= is for start_at_layer (the first argument is then the residual stream); "
                             "otherwise pass the tokens first")
        if p.get("resid") is not None:
            raise TypeError("the residual is given twice: first argument and resid=")
        p["resid"], p["input_ids"], p["tokens"] = p["input_ids"], p["tokens"], None
    first = p["input_ids"]
    if isinstance(first, Mapping):
        p = merge_batch(p, first)
    elif isinstance(first, (str, list, tuple)):
        p["input_ids"] = model.to_tokens(list(first) if isinstance(first, tuple) else first,
                                         prepend_bos=p.get("prepend_bos"), padding_side=p.get("padding_side"))
    elif isinstance(first, Tensor) and first.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor, got {first.dtype}; for a residual-stream input "
                        "pass start_at_layer= and tokens= (the input ids or the batch)")
    elif first is None:
        raise TypeError("forward needs input_ids (or a batch mapping, or text)")
    if p.get("start_at_layer") is not None and p.get("resid") is None:
        raise ValueError("start_at_layer needs the residual stream: model(resid, start_at_layer=l, tokens=ids) "
                         "or model(ids, start_at_layer=l, resid=resid)")
    return p
