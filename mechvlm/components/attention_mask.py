"""Which keys each query may attend: one object per forward pass, shared by all layers.

Dense masks are built lazily and cached per sliding window, so a plain causal forward
without padding never materialises a ``[q, k]`` mask (SDPA gets ``is_causal=True``).
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class AttentionMask:
    """Causal attention with optional key padding, sliding windows and bidirectional blocks.

    Args:
        batch, seq_len, device: the forward pass's sizes.
        key_padding: ``[batch, pos]`` True for real tokens, or None when there is no padding.
        block_ids: ``[batch, pos]`` (Gemma3) >= 0 for tokens of a bidirectional block (all
            tokens with the same id see each other), -1 elsewhere; None for purely causal.

    The rule, per layer with window ``W`` (None for full attention):
    ``allowed[q, k] = (k <= q OR same_block) AND (W is None OR k > q - W) AND key_padding[k]``.
    """

    def __init__(self, batch: int, seq_len: int, device: torch.device,
                 key_padding: Bool[Tensor, "batch pos"] | None = None,
                 block_ids: Int[Tensor, "batch pos"] | None = None):
        self.batch = batch
        self.seq_len = seq_len
        self.device = device
        self.key_padding = key_padding
        self.block_ids = block_ids
        self._dense: dict[int | None, Tensor] = {}

    def is_plain_causal(self, window: int | None) -> bool:
        """True when SDPA's ``is_causal=True`` is exactly this layer's mask."""
        return (self.key_padding is None and self.block_ids is None
                and (window is None or window >= self.seq_len))

    def dense(self, window: int | None = None) -> Bool[Tensor, "batch 1 q k"]:
        """The boolean mask (True = may attend), built once per window and reused."""
        if window is not None and window >= self.seq_len:
            window = None
        if window not in self._dense:
            idx = torch.arange(self.seq_len, device=self.device)
            allowed = idx[None, :] <= idx[:, None]  # [q, k]
            allowed = allowed[None, None].expand(self.batch, 1, -1, -1)
            if self.block_ids is not None:
                b = self.block_ids
                same = (b[:, None, :, None] == b[:, None, None, :]) & (b[:, None, :, None] >= 0)
                allowed = allowed | same
            if window is not None:
                allowed = allowed & (idx[None, :] > idx[:, None] - window)[None, None]
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, None, :]
            self._dense[window] = allowed.expand(self.batch, 1, self.seq_len, self.seq_len).contiguous()
        return self._dense[window]

    def sdpa_mask(self, window: int | None) -> Bool[Tensor, "batch 1 q k"] | None:
        """None when ``is_causal=True`` suffices, else the dense mask."""
        return None if self.is_plain_causal(window) else self.dense(window)

    def to(self, device, non_blocking: bool = False) -> "AttentionMask":
        """This mask on ``device`` (for a block placed there, `mechvlm.placement`): its
        tensors moved once per device, its dense masks rebuilt there when asked."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved_by_device = self.__dict__.setdefault("_moved", {})
        if device not in moved_by_device:
            moved = copy.copy(self)
            for name, value in vars(self).items():
                if isinstance(value, Tensor):
                    setattr(moved, name, value.to(device, non_blocking=non_blocking))
            moved.device, moved._dense, moved._moved = device, {}, {}
            moved_by_device[device] = moved
        return moved_by_device[device]
