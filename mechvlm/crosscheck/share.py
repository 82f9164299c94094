"""Seed 000 Eq. 1-2 from attention patterns and boolean role masks (no model code)."""

from __future__ import annotations

import torch
from torch import Tensor


def share_from_patterns(patterns: list[Tensor], text: Tensor, key_masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Seed 000 Eq. 1-2 per example, layer and head, then averaged over examples:
    ``f_r = sum_{i in text} sum_{j in K_r} A_ij``, ``share_r = f_r / sum_r' f_r'``.
    Returns ``{key: [layer, head]}`` (fp32); an example with no mass on any key role (no
    text query, no image) has NaN shares and is skipped in the mean. Used for the HF side
    and as the fallback of the mechvlm side."""
    f = {}
    q = text.float()
    for name, keys in key_masks.items():
        per_layer = [torch.einsum("bhqk,bq,bk->bh", p.float(), q.to(p.device), keys.float().to(p.device))
                     for p in patterns]
        f[name] = torch.stack(per_layer, 1)  # [batch, layer, head]
    total = sum(f.values())
    return {name: (v / total).nanmean(0) for name, v in f.items()}
