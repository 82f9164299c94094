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


class VLMBatch(dict):
    """The batch dict ``to_inputs`` returns (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...), with ``shape`` = ``input_ids.shape``: TransformerLens'
    ``patching`` functions read ``corrupted_tokens.shape`` of what they pass to the model."""

    @property
    def shape(self) -> torch.Size:
        return self["input_ids"].shape

    def to(self, device) -> "VLMBatch":
        return VLMBatch({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()})

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
