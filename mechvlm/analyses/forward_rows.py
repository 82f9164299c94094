"""Forwards over copies of a batch, reading the logits at one position per row.

Analyses that try many interventions on the same examples (head attribution, causal
tracing) stack ``copies`` copies of a batch, block after block (row ``c * ex + e`` is copy
``c`` of example ``e``; the layout `mechvlm.interventions.by_row` expects), and read only
the logits at the answer position: the ``[rows, pos, d_vocab]`` logits are never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.metrics._common import Batch, Hooks


def image_embeds(model, batch: Batch) -> Tensor | None:
    """The vision encoder's output for the batch's images (None without images)."""
    if batch.get("pixel_values") is None:
        return None
    with torch.no_grad():
        return model.encode_images(batch["pixel_values"], batch.get("image_grid_thw"))


def repeat_batch(batch: Batch, copies: int, embeds: Tensor | None = None) -> dict:
    """``copies`` copies of ``batch`` block after block. With ``embeds`` (the batch's
    `image_embeds`) the copies reuse them (``image_embeds=`` of ``forward``), and
    ``pixel_values`` becomes a zero-stride placeholder of the right shape (the forward only
    checks its shape when ``image_embeds`` is given), so nothing image-sized is copied."""
    out = {}
    for key, value in batch.items():
        if value is None or not isinstance(value, Tensor):
            out[key] = value
        elif key == "pixel_values" and embeds is not None:
            out[key] = value.new_zeros(()).expand(value.shape[0] * copies, *value.shape[1:])
        else:
            out[key] = value.repeat(copies, *([1] * (value.ndim - 1)))
    if embeds is not None:
        out["image_embeds"] = embeds.repeat(copies, 1)
    return out


def last_positions(batch: Batch) -> Int[Tensor, " batch"]:
    """The last real position of each row (``attention_mask`` aware)."""
    ids = batch["input_ids"]
    am = batch.get("attention_mask")
    if am is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return torch.where(am.bool().cpu(), pos, -1).max(-1).values


def logits_at(model, batch: Batch, hooks: Hooks, positions: Int[Tensor, " batch"]
              ) -> Float[Tensor, "batch d_vocab"]:
    """The model's logits at one position per row, op for op as its own (the final norm's
    weight and the unembedding applied to ``ln_final.hook_normalized`` at those positions)."""
    norm = model.ln_final
    got = {}
    rows = torch.arange(len(positions), device=model.device)
    pos = positions.to(model.device)

    def read(x: Tensor, hook) -> None:
        got["x"] = x[rows, pos]

    with torch.no_grad():
        model.run_with_hooks(**batch, fwd_hooks=list(hooks) + [("ln_final.hook_normalized", read)],
                             return_type=None)
        x = got["x"]
        if norm.offset_weight:
            x = (x * (1.0 + norm.w.float())).to(model.dtype)
        else:
            x = norm.w * x
        return F.linear(x, model.unembed.weight)
