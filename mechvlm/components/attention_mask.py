"""Which keys each query may attend: one object per forward pass, shared by all layers.

Dense masks are built lazily and cached per sliding window, so a plain causal forward
without padding never materialises a ``[q, k]`` mask (SDPA gets ``is_causal=True``).
A forward over a KV cache (``offset`` cached positions) has ``seq_len`` new queries and
``offset + seq_len`` keys; its queries are the absolute positions ``offset ..``.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class AttentionMask:
    """Causal attention with optional key padding, sliding windows and bidirectional blocks.

    Args:
        batch, seq_len, device: the forward pass's sizes (``seq_len`` = new query positions).
        key_padding: ``[batch, offset + seq_len]`` True for real tokens, or None when no
            key is padding.
        block_ids: ``[batch, offset + seq_len]`` (Gemma3) >= 0 for tokens of a
            bidirectional block (all tokens with the same id see each other), -1 elsewhere;
            None for purely causal.
        offset: positions already in the KV cache (0 without a cache).

    The rule, per layer with window ``W`` (None for full attention), for absolute positions
    ``q`` (query) and ``k`` (key):
    ``allowed[q, k] = (k <= q OR same_block) AND (W is None OR k > q - W) AND key_padding[k]``.
    """

    def __init__(self, batch: int, seq_len: int, device: torch.device,
                 key_padding: Bool[Tensor, "batch key"] | None = None,
                 block_ids: Int[Tensor, "batch key"] | None = None, offset: int = 0):
        self.batch = batch
        self.seq_len = seq_len
        self.offset = offset
        self.key_len = offset + seq_len
        self.device = device
        self.key_padding = key_padding
        self.block_ids = block_ids
        self._dense: dict[int | None, Tensor] = {}

    def is_plain_causal(self, window: int | None) -> bool:
        """True when SDPA's ``is_causal=True`` (top-left aligned) is exactly this layer's mask."""
        return (self.offset == 0 and self.key_padding is None and self.block_ids is None
                and (window is None or window >= self.seq_len))

    def sees_every_key(self, window: int | None) -> bool:
        """True when every query may attend every key (one new query over a cache, no
        padding, no window cut): SDPA needs no mask and no causal flag."""
        return (self.offset > 0 and self.seq_len == 1 and self.key_padding is None
                and (window is None or window >= self.key_len))

    def dense(self, window: int | None = None) -> Bool[Tensor, "batch 1 q k"]:
        """The boolean mask (True = may attend), built once per window and reused."""
        if window is not None and window >= self.key_len:
            window = None
        if window not in self._dense:
            q_pos = torch.arange(self.offset, self.key_len, device=self.device)
            k_pos = torch.arange(self.key_len, device=self.device)
            allowed = k_pos[None, :] <= q_pos[:, None]  # [q, k]
            allowed = allowed[None, None].expand(self.batch, 1, -1, -1)
            if self.block_ids is not None:
                b = self.block_ids
                bq = b[:, self.offset:]
                same = (bq[:, None, :, None] == b[:, None, None, :]) & (bq[:, None, :, None] >= 0)
                allowed = allowed | same
            if window is not None:
                allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)[None, None]
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, None, :]
            self._dense[window] = allowed.expand(self.batch, 1, self.seq_len, self.key_len).contiguous()
        return self._dense[window]

    def sdpa_args(self, window: int | None) -> tuple[Bool[Tensor, "batch 1 q k"] | None, bool]:
        """``(attn_mask, is_causal)`` for SDPA: no dense mask where a flag says it all."""
        if self.is_plain_causal(window):
            return None, True
        if self.sees_every_key(window):
            return None, False
        return self.dense(window), False

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
