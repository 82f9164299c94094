"""Per-position contribution of the image tokens to the answer loss (seed 001).

The contribution of a unit -- one image token, one grid row, or one ``block x block``
block of cells -- is the increase of the target-token loss when that unit alone is
dropped (removed from the sequence or masked as keys, `mechvlm.interventions.pruning`):
``loss(without unit) - loss(full input)``. Positive: the unit helps.

The single-unit drops are batched: every variant (each example's full input, and each
example with one unit dropped) is a row, and ``batch_size`` rows run in one forward, so an
image of ``n`` units costs ``ceil((n + 1) / batch_size)`` forwards instead of ``n + 1``.
The vision tower runs once per loss batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.analyses._common import DROP_MODES, LossBatch, image_features, loss_batch_list, loss_without, repeat_rows
from mechvlm.distributed import map_units
from mechvlm.image_layout import ImageSpan, check_one_grid_images
from mechvlm.metrics._common import frame

UNITS = ("token", "row", "block")


def image_units(span: ImageSpan, unit: str, block: int = 2) -> list[list[int]]:
    """The units of one image: lists of token indices into ``span`` (every token in one
    unit). ``token``: each token; ``row``: the tokens of each grid row (per frame);
    ``block``: the tokens of each ``block x block`` square of cells (edge blocks smaller)."""
    _, h, w = span.grid
    cells = torch.tensor(span.cell_ids)
    t_idx, row, col = cells // (h * w), (cells // w) % h, cells % w
    if unit == "token":
        key = torch.arange(span.n_tokens)
    elif unit == "row":
        key = t_idx * h + row
    elif unit == "block":
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        nbw = -(-w // block)
        key = (t_idx * -(-h // block) + row // block) * nbw + col // block
    else:
        raise ValueError(f"unknown unit {unit!r}; choose from {UNITS}")
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(key.tolist()):
        groups.setdefault(k, []).append(i)
    return [groups[k] for k in sorted(groups)]


@dataclass
class ContributionResult:
    """Loss increase when one unit of an image is dropped.

    Attributes:
        maps: per image (examples in order, each example's images in sequence order)
            ``[t, h, w]``: the loss increase of the unit holding each cell (NaN for a cell
            that has no token in the input).
        unit_delta: per image ``[n_units]`` the loss increase of each unit.
        units: per image, the units as lists of grid cells.
        spans: per image, its `ImageSpan` in its loss batch (``row`` is the row there).
        example: ``[image]`` the example (row over all batches) of each image.
        base_loss: ``[example]`` the target loss of the full input.
        unit, block, mode, batch_size; n_forwards: forwards run (every one counted);
            n_variants: rows run (full inputs + single-unit drops).
    """

    maps: list[Float[Tensor, "t h w"]]
    unit_delta: list[Float[Tensor, " unit"]]
    units: list[list[list[int]]]
    spans: list[ImageSpan]
    example: Int[Tensor, " image"]
    base_loss: Float[Tensor, " example"]
    unit: str
    block: int
    mode: str
    batch_size: int
    n_forwards: int
    n_variants: int

    def to_dict(self) -> dict:
        return {"maps": self.maps, "unit_delta": self.unit_delta, "units": self.units,
                "grids": [s.grid for s in self.spans], "example": self.example, "base_loss": self.base_loss,
                "unit": self.unit, "block": self.block, "mode": self.mode, "batch_size": self.batch_size,
                "n_forwards": self.n_forwards, "n_variants": self.n_variants}

    def to_frame(self):
        """Long format: one row per (image, unit)."""
        rows = []
        for i, (delta, units) in enumerate(zip(self.unit_delta, self.units)):
            for u, (d, cells) in enumerate(zip(delta.tolist(), units)):
                rows.append({"image": i, "example": int(self.example[i]), "unit": u, "cells": cells, "delta": d})
        return frame(rows)


@torch.no_grad()
def token_contribution(
    model,
    batches: LossBatch | Iterable[LossBatch],
    *,
    unit: str = "token",
    block: int = 2,
    mode: str = "removed",
    batch_size: int = 16,
    progress: bool = True,
    journal=None,
) -> ContributionResult:
    """Per-unit contribution map of every image (see the module doc).

    Args:
        model: a `HookedVLM`.
        batches: ``(batch, target_mask)`` pairs (`InputBuilder.with_targets`), or one pair.
        unit: ``"token"``, ``"row"`` or ``"block"`` (``block x block`` cells).
        mode: ``"removed"`` (from the sequence) or ``"masked"`` (as keys).
        batch_size: variants (rows) per forward.
        progress: a tqdm bar over the batches.
        journal: a `mechvlm.journal.JournalTask`: batches it holds are read back, the
            others computed and appended (a resumable run).

    Under an initialised process group (``torchrun``) the batches are shared out over the
    ranks (`mechvlm.distributed.map_units`) and every rank returns the one-process result.
    """
    if mode not in DROP_MODES:
        raise ValueError(f"mode must be one of {DROP_MODES}, got {mode!r}")
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose from {UNITS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    def layout(batch):
        roles = model.roles(**batch)
        check_one_grid_images(roles.spans, "token_contribution")
        spans = sorted(roles.spans, key=lambda s: (s.row, s.start))
        units = {s.image: image_units(s, unit, block) for s in spans}
        # variants: (row, span or None, unit index); the full input of each row first
        variants = [(r, None, -1) for r in range(roles.shape[0])]
        variants += [(s.row, s, u) for s in spans for u in range(len(units[s.image]))]
        return roles, spans, units, variants

    def one_batch(pair) -> dict:
        batch, target = pair
        roles, spans, units, variants = layout(batch)
        feats = image_features(model, batch)
        losses = torch.empty(len(variants))
        n_forwards = 0
        for start in range(0, len(variants), batch_size):
            chunk = variants[start:start + batch_size]
            sub = repeat_rows(batch, roles, [r for r, _, _ in chunk], feats)
            sub_roles = model.roles(**sub)
            drop = torch.zeros(sub_roles.shape, dtype=torch.bool)
            for i, (r, s, u) in enumerate(chunk):
                if s is None:
                    continue
                drop[i, s.start + torch.tensor(units[s.image][u])] = True  # repeat_rows keeps the columns
            losses[start:start + len(chunk)] = loss_without(model, sub, target[[r for r, _, _ in chunk]],
                                                            sub_roles, drop, mode)
            n_forwards += 1
        return {"losses": losses, "n_forwards": n_forwards}

    pairs = loss_batch_list(batches)
    parts = map_units(one_batch, pairs, journal=journal, progress=progress, desc="token_contribution")
    maps, deltas, units_out, spans_out, example, base = [], [], [], [], [], []
    n_forwards = n_variants = n_examples = 0
    for (batch, _), part in zip(pairs, parts, strict=True):
        roles, spans, units, variants = layout(batch)
        losses = part["losses"]
        n_forwards += part["n_forwards"]
        n_variants += len(variants)
        row_base = losses[:roles.shape[0]]
        base.append(row_base)
        at = roles.shape[0]
        for s in spans:
            n_units = len(units[s.image])
            delta = losses[at:at + n_units] - row_base[s.row]
            at += n_units
            grid = torch.full((s.n_cells,), float("nan"))
            cells = torch.tensor(s.cell_ids)
            unit_cells = []
            for u, members in enumerate(units[s.image]):
                grid[cells[members]] = delta[u]
                unit_cells.append(cells[members].tolist())
            maps.append(grid.reshape(s.grid))
            deltas.append(delta)
            units_out.append(unit_cells)
            spans_out.append(s)
            example.append(n_examples + s.row)
        n_examples += roles.shape[0]
    return ContributionResult(maps=maps, unit_delta=deltas, units=units_out, spans=spans_out,
                              example=torch.tensor(example, dtype=torch.long), base_loss=torch.cat(base),
                              unit=unit, block=block, mode=mode, batch_size=batch_size, n_forwards=n_forwards,
                              n_variants=n_variants)
