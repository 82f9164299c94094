"""Dropping image tokens (seed 001's token budget, EmbedLens' pruning): the two readings.

* **masked as keys** (`mask_image_keys`): the sequence is unchanged, but no query may
  attend the dropped tokens (removed from the attention mask before the softmax, so
  every row renormalises over the keys left). Hooks, through SDPA.
* **removed from the sequence** (`remove_image_tokens`): a shorter batch without the
  dropped tokens, with the positions the model gives that sequence (the family's
  ``prepare_inputs`` with ``image_cells``): for Qwen2.5-VL the kept tokens keep their mRoPE
  grid positions and the text after the image keeps its own, so it is the same
  computation as masking the tokens as keys (up to rounding); for Gemma3 the 1-D positions
  of the shorter sequence (the text after a pruned image moves up by the number of
  tokens dropped) and a bidirectional block over the kept tokens, which differs from
  masking.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechvlm.image_layout import check_one_grid_images
from mechvlm.interventions._common import Hooks
from mechvlm.interventions.attention import knockout
from mechvlm.roles import TokenRoles

#: Per-token inputs that follow the kept columns (besides input_ids / attention_mask).
_PER_TOKEN = ("token_type_ids",)


def _check_drop(roles: TokenRoles, drop: Tensor) -> Bool[Tensor, "batch pos"]:
    if not isinstance(drop, Tensor) or drop.dtype != torch.bool:
        raise TypeError("drop must be a [batch, pos] bool mask of the image tokens to drop")
    if tuple(drop.shape) != tuple(roles.shape):
        raise ValueError(f"drop has shape {tuple(drop.shape)}, the batch {tuple(roles.shape)}")
    drop = drop.to(roles.image.device)
    if bool((drop & ~roles.image).any()):
        row, pos = (drop & ~roles.image).nonzero()[0].tolist()
        raise ValueError(f"drop marks a token that is not an image token (row {row}, position {pos}); "
                         "only image tokens can be dropped")
    return drop


def mask_image_keys(roles: TokenRoles, drop: Bool[Tensor, "batch pos"],
                    layers: Iterable[int] | int | None = None) -> Hooks:
    """Mask the ``drop`` image tokens as keys: no query attends them, in ``layers`` (default
    all). A pre-softmax knockout from every real query (``knockout(roles, "real", drop)``):
    each attention row renormalises over the keys left; no pattern is materialised.
    The dropped tokens' own rows still run (and nothing reads them)."""
    drop = _check_drop(roles, drop)
    return knockout(roles, query="real", key=drop, layers=layers, mode="pre_softmax_mask")


@dataclass
class PrunedBatch:
    """A batch with image tokens removed (`remove_image_tokens`).

    Attributes:
        batch: the ``HookedVLM.forward`` keyword arguments of the shorter sequence
            (left-padded again, with ``image_cells``; images and ``image_embeds`` unchanged).
        source_positions: ``[batch, new_pos]`` the position in the original row of every
            new position (-1 for the new padding).
        dropped: ``[batch, pos]`` the original tokens that were removed.
    """

    batch: dict
    source_positions: Int[Tensor, "batch new_pos"]
    dropped: Bool[Tensor, "batch pos"]

    def take(self, values: Tensor, fill=0) -> Tensor:
        """A per-position ``[batch, pos, ...]`` tensor of the original batch (a target mask,
        labels) carried to the new layout; new padding gets ``fill``."""
        if values.shape[:2] != self.dropped.shape:
            raise ValueError(f"values have shape {tuple(values.shape)}, the original batch "
                             f"{tuple(self.dropped.shape)}")
        src = self.source_positions.to(values.device)
        idx = src.clamp(min=0).reshape(*src.shape, *([1] * (values.ndim - 2))).expand(
            *src.shape, *values.shape[2:])
        out = values.gather(1, idx)
        pad = (src < 0).reshape(*src.shape, *([1] * (values.ndim - 2)))
        return out.masked_fill(pad, fill)


def remove_image_tokens(batch: Mapping, roles: TokenRoles, drop: Bool[Tensor, "batch pos"], *,
                        pad_id: int = 0) -> PrunedBatch:
    """Remove the ``drop`` image tokens from the sequence.

    Every row keeps its real tokens except the dropped ones, in order, and is left-padded
    again (``pad_id``, attention mask 0). The images stay whole (``pixel_values``,
    ``image_grid_thw`` and any ``image_embeds`` are passed on); ``image_cells`` tells the
    model which grid cell each remaining image token is, so it scatters those features and
    gives the positions of the shorter sequence (see the module doc). Each image must keep
    at least one token (mask the tokens as keys, `mask_image_keys`, to drop all of them).

    Args:
        batch: ``HookedVLM.forward`` keyword arguments (the ones ``roles`` was built from).
        roles: ``model.roles(**batch)``.
        drop: ``[batch, pos]`` bool, True on the image tokens to remove.
    """
    roles.check_ids(batch["input_ids"], used_by="remove_image_tokens")
    check_one_grid_images(roles.spans, "remove_image_tokens", videos_allowed=True)
    drop = _check_drop(roles, drop).cpu()
    if bool((drop & roles.video.cpu()).any()):
        raise NotImplementedError("drop selects video tokens; remove_image_tokens removes image tokens only "
                                  "(image_cells index images; mask video tokens as keys instead)")
    image_spans = [s for s in roles.spans if s.modality == "image"]
    real = roles.real.cpu()
    n_rows = drop.shape[0]
    cells = []
    for s in sorted(image_spans, key=lambda s: s.image):
        kept = [c for c, d in zip(s.cell_ids, drop[s.row, s.start:s.stop].tolist()) if not d]
        if not kept:
            raise ValueError(f"drop removes every token of image {s.image} (row {s.row}); an image must keep "
                             "at least one token in the sequence (mask its tokens as keys instead)")
        cells.append(torch.tensor(kept, dtype=torch.long))
    keep = real & ~drop
    width = int(keep.sum(-1).max())
    source = torch.full((n_rows, width), -1, dtype=torch.long)
    for row in range(n_rows):
        pos = keep[row].nonzero().squeeze(-1)
        source[row, width - len(pos):] = pos
    valid = source >= 0
    idx = source.clamp(min=0)
    ids = batch["input_ids"]
    new_ids = ids.cpu().gather(1, idx).masked_fill(~valid, pad_id).to(ids.device)
    out = dict(batch)
    out["input_ids"] = new_ids
    out["attention_mask"] = valid.long().to(ids.device)
    for key in _PER_TOKEN:
        if batch.get(key) is not None:
            t = batch[key]
            out[key] = t.cpu().gather(1, idx).masked_fill(~valid, 0).to(t.device)
    if image_spans:
        out["image_cells"] = cells
    return PrunedBatch(batch=out, source_positions=source, dropped=drop)
