"""Plumbing shared by the analyses: loss batches, answer-token losses per row, and batches
made of (repeated) rows of another batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.interventions.pruning import mask_image_keys, remove_image_tokens
from mechvlm.losses import next_token_loss, scored_positions
from mechvlm.roles import TokenRoles

#: ``(batch, target_mask)``: ``HookedVLM.forward`` keyword arguments and the ``[batch, pos]``
#: bool mask of the tokens whose loss is measured (`InputBuilder.with_targets`).
LossBatch = tuple[Mapping, Tensor]
#: How dropped image tokens are dropped: from the sequence, or as keys (`mechvlm.interventions.pruning`).
DROP_MODES = ("removed", "masked")


def loss_batch_list(batches: LossBatch | Iterable[LossBatch]) -> list[LossBatch]:
    """One ``(batch, target_mask)`` pair or an iterable of them, as a checked list."""
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Mapping):
        batches = [batches]
    batches = list(batches)
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], Mapping)
                and isinstance(b[1], Tensor)):
            raise TypeError(f"loss batch {i}: expected a (batch dict, target_mask tensor) pair, as "
                            f"InputBuilder.with_targets returns, got {type(b).__name__}")
    return batches


def iter_loss_batches(batches: LossBatch | Iterable[LossBatch], progress: bool, desc: str):
    """One ``(batch, target_mask)`` pair or an iterable of them, in a tqdm bar."""
    from tqdm.auto import tqdm

    return tqdm(loss_batch_list(batches), desc=desc, disable=not progress, unit="batch", leave=False)


@torch.no_grad()
def row_losses(model, batch: Mapping, target_mask: Bool[Tensor, "batch pos"], hooks: Sequence = ()
               ) -> Float[Tensor, " batch"]:
    """Mean answer-token cross-entropy of each row (`mechvlm.losses.next_token_loss`; NaN for a
    row without a scored token). Only the window of positions that predict a target is
    unembedded, so the ``[batch, pos, d_vocab]`` logits are never built."""
    ids = batch["input_ids"].to(model.device)
    am = batch.get("attention_mask")
    target_mask = target_mask.to(ids.device)
    keep = scored_positions(ids, target_mask, attention_mask=am, image_token_id=model.cfg.image_token_id)
    cols = keep.any(0).nonzero()
    if not len(cols):
        raise ValueError("no token is scored: the target mask selects no real, non-image token after position 0")
    start = int(cols[0]) - 1  # the position predicting the first target
    grabbed = {}

    def grab(module, args, output):  # the final norm's output (its hook points precede the weight)
        grabbed["x"] = output[:, start:]

    handle = model.ln_final.register_forward_hook(grab)
    try:
        model.run_with_hooks(**batch, return_type=None, fwd_hooks=list(hooks))
    finally:
        handle.remove()
    logits = model.unembed(grabbed["x"])
    sl = slice(start, None)
    nll = next_token_loss(logits, ids[:, sl], target_mask[:, sl], attention_mask=None if am is None else am[:, sl],
                          image_token_id=model.cfg.image_token_id, per_token=True)
    count = keep[:, sl][:, 1:].sum(-1)
    return (nll.sum(-1) / count).float().cpu().masked_fill(count.cpu() == 0, float("nan"))


def image_pixel_rows(batch: Mapping, n_images: int) -> list[slice]:
    """The ``pixel_values`` rows of each image: patch rows ``t*h*w`` each with an
    ``image_grid_thw`` (Qwen2.5-VL), else one row per image (Gemma3)."""
    grid = batch.get("image_grid_thw")
    if grid is not None:
        sizes = grid.prod(-1).tolist()
    else:
        sizes = [1] * n_images
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + int(n)))
        start += int(n)
    return out


def repeat_rows(batch: Mapping, roles: TokenRoles, rows: Sequence[int], image_embeds: Tensor | None = None) -> dict:
    """A batch whose row ``i`` is row ``rows[i]`` of ``batch`` (rows may repeat), with the
    images of those rows (``pixel_values``, ``image_grid_thw``, ``image_cells``) and their
    features ``image_embeds`` (the vision output of ``batch``'s images, feature order) so
    the vision tower does not run again."""
    spans = sorted(roles.spans, key=lambda s: s.image)
    by_row = {}
    for s in spans:
        by_row.setdefault(s.row, []).append(s.image)
    images = [k for r in rows for k in by_row.get(r, [])]
    idx = torch.tensor(list(rows), dtype=torch.long)
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if batch.get(key) is not None:
            out[key] = batch[key][idx.to(batch[key].device)]
    if batch.get("pixel_values") is not None and images:
        pix = image_pixel_rows(batch, len(spans))
        pv = batch["pixel_values"]
        out["pixel_values"] = torch.cat([pv[pix[k]] for k in images])
        if batch.get("image_grid_thw") is not None:
            out["image_grid_thw"] = batch["image_grid_thw"][torch.tensor(images, device=batch["image_grid_thw"].device)]
    if batch.get("image_cells") is not None and images:
        out["image_cells"] = [batch["image_cells"][k] for k in images]
    if image_embeds is not None and images:
        offsets = [0]
        for s in spans:
            offsets.append(offsets[-1] + s.n_cells)
        out["image_embeds"] = torch.cat([image_embeds[offsets[k]:offsets[k + 1]] for k in images])
    return out


def image_features(model, batch: Mapping) -> Tensor | None:
    """The vision output of ``batch``'s images (``batch["image_embeds"]`` when present)."""
    if batch.get("image_embeds") is not None:
        return batch["image_embeds"]
    if batch.get("pixel_values") is None:
        return None
    with torch.no_grad():
        return model.encode_images(batch["pixel_values"], batch.get("image_grid_thw"))


def loss_without(model, batch: Mapping, target: Tensor, roles: TokenRoles, drop: Tensor, mode: str
                 ) -> Float[Tensor, " batch"]:
    """`row_losses` with the ``drop`` image tokens removed from the sequence or masked as keys."""
    drop = drop.to(roles.image.device)
    if mode == "masked":
        return row_losses(model, batch, target, mask_image_keys(roles, drop))
    if mode != "removed":
        raise ValueError(f"mode must be one of {DROP_MODES}, got {mode!r}")
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    pruned = remove_image_tokens(batch, roles, drop, pad_id=pad)
    return row_losses(model, pruned.batch, pruned.take(target.to(pruned.source_positions.device), fill=False))
