"""What one side of a cross-check records (the HF side and the mechvlm side alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Run:
    """Logits and, for a clean run, the embeddings, per-layer residuals, the final norm
    and per-layer patterns ``[batch, head, q, k]``."""

    logits: Tensor
    embed: Tensor | None = None
    resid_post: list[Tensor] = field(default_factory=list)
    final_norm: Tensor | None = None
    patterns: list[Tensor] = field(default_factory=list)
