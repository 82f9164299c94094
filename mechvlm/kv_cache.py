"""A key/value cache for `HookedVLM`: prefill once, then run only the new tokens.

The shape of TransformerLens' ``TransformerLensKeyValueCache`` (formerly
``HookedTransformerKeyValueCache``): one entry per layer, ``cache[l].past_keys`` /
``past_values`` ``[batch, pos_so_far, kv_head, d_head]``, ``previous_attention_mask``,
``freeze()`` / ``unfreeze()``, passed as ``model(..., past_kv_cache=cache)``. What a VLM
needs on top is kept here too: the token ids so far (for token roles), the image spans and
Gemma3's bidirectional blocks of the prefill, and each row's next position (Qwen2.5-VL's
text positions jump after an image, HF's ``rope_deltas``).

Use::

    cache = VLMKeyValueCache.init_cache(model.cfg, model.device, batch_size)
    logits = model(**prompt_batch, past_kv_cache=cache)          # prefill: images encoded once
    logits = model(next_ids[:, None], past_kv_cache=cache)       # one (or several) new tokens

What is cached, per layer: the keys after ``hook_rot_k`` (so after RoPE and any edit at
``hook_k`` / ``hook_rot_k``) and the values after ``hook_v``. An edit of ``hook_k`` /
``hook_v`` in the prefill is therefore what every later step attends to; cached keys and
values are not hooked again. A continuation holds text only (no image tokens), so
``hook_image_embeds`` fires in the prefill only; its ``attention_mask`` may cover the new
tokens (``[batch, new]``) or the whole sequence.

Sliding-window layers keep every position (not just the window), so the key axis of every
layer is the absolute position (role masks and ``hook_pattern`` line up); the window is a
mask. Issue-21 style reuse: `fork` copies a cache (prefill a shared prefix once, continue
each condition from its own copy), `select_rows` / `repeat_interleave` re-batch it, and a
frozen cache runs a continuation without keeping it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechvlm.forward_positions import forward_positions
from mechvlm.image_layout import ImageSpan
from mechvlm.models.base import PreparedInputs, check_input_ids


class VLMKeyValueCacheEntry:
    """One layer's cached keys and values, stored heads-first (SDPA's layout) in a buffer
    that grows by doubling (or to `reserve`'s size), so an append writes in place."""

    def __init__(self, batch: int, n_kv_heads: int, d_head: int, dtype: torch.dtype, device):
        self._k = torch.empty(batch, n_kv_heads, 0, d_head, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.length = 0
        self.frozen = False

    @property
    def past_keys(self) -> Float[Tensor, "batch pos kv_head d_head"]:
        """The cached keys (after ``hook_rot_k``), TransformerLens layout (a view)."""
        return self._k[:, :, :self.length].transpose(1, 2)

    @property
    def past_values(self) -> Float[Tensor, "batch pos kv_head d_head"]:
        """The cached values (after ``hook_v``), TransformerLens layout (a view)."""
        return self._v[:, :, :self.length].transpose(1, 2)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (no-op when there is)."""
        if capacity > self.capacity:
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, new)

    def append(self, keys: Float[Tensor, "batch kv_head new d_head"],
               values: Float[Tensor, "batch kv_head new d_head"]) -> tuple[Tensor, Tensor]:
        """Add the new positions; returns all keys and values ``[batch, kv_head, pos, d_head]``
        (a frozen entry returns them without keeping the new ones)."""
        if keys.shape[0] != self._k.shape[0] or keys.shape[1] != self._k.shape[1]:
            raise ValueError(f"the KV cache holds [batch={self._k.shape[0]}, kv_head={self._k.shape[1]}] but "
                             f"the forward has [batch={keys.shape[0]}, kv_head={keys.shape[1]}]")
        n, end = keys.shape[2], self.length + keys.shape[2]
        if self.frozen:
            return (torch.cat([self._k[:, :, :self.length], keys], dim=2),
                    torch.cat([self._v[:, :, :self.length], values], dim=2))
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        if keys.requires_grad or values.requires_grad or self._k.requires_grad:
            # autograd: keep the graph (out of place) instead of writing into the buffer
            self._k = torch.cat([self._k[:, :, :self.length], keys.to(self._k.dtype)], dim=2)
            self._v = torch.cat([self._v[:, :, :self.length], values.to(self._v.dtype)], dim=2)
        else:
            self._k[:, :, self.length:end] = keys
            self._v[:, :, self.length:end] = values
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (a failed forward rolls back with it)."""
        self.length = min(self.length, length)

    def select_rows(self, rows: Tensor) -> "VLMKeyValueCacheEntry":
        out = copy.copy(self)
        out._k = self._k[:, :, :self.length].index_select(0, rows).contiguous()
        out._v = self._v[:, :, :self.length].index_select(0, rows).contiguous()
        out.frozen = False
        return out


@dataclass
class VLMKeyValueCache:
    """Per-layer entries plus what a continuation needs to know about the sequence so far.

    Attributes:
        entries: one `VLMKeyValueCacheEntry` per layer.
        previous_attention_mask: ``[batch, pos_so_far]`` 1 for real tokens (TL's name).
        input_ids: ``[batch, pos_so_far]`` the tokens so far (token roles need them).
        spans: the prefill's image spans (the continuation holds no image).
        block_ids: ``[batch, pos_so_far]`` Gemma3's bidirectional blocks (-1: none), or None.
        next_position: ``[batch]`` the RoPE position of each row's next real token: the
            largest position so far + 1 (HF's ``rope_deltas`` rule for Qwen2.5-VL).
        position_rows: 3 for mRoPE position ids ``[3, batch, pos]``, None for 1-D.
        frozen: a frozen cache runs forwards without keeping their tokens.
        allow_image_token_ids: embed image / video placeholder ids in a continuation as
            plain tokens (what HF's ``generate`` does with a generated placeholder id; set
            by `mechvlm.generation`). Off, a continuation holding them raises.
    """

    entries: list[VLMKeyValueCacheEntry]
    previous_attention_mask: Int[Tensor, "batch pos"]
    input_ids: Int[Tensor, "batch pos"]
    spans: list[ImageSpan] = field(default_factory=list)
    block_ids: Int[Tensor, "batch pos"] | None = None
    next_position: Int[Tensor, " batch"] | None = None
    position_rows: int | None = None
    frozen: bool = False
    allow_image_token_ids: bool = False

    @classmethod
    def init_cache(cls, cfg, device: torch.device | str | None = None, batch_size: int = 1) -> "VLMKeyValueCache":
        """An empty cache for ``batch_size`` rows of a model with config ``cfg``."""
        device = torch.device(device if device is not None else cfg.device)
        entries = [VLMKeyValueCacheEntry(batch_size, cfg.n_kv_heads, cfg.d_head, cfg.dtype, device)
                   for _ in range(cfg.n_layers)]
        empty = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return cls(entries=entries, previous_attention_mask=empty, input_ids=empty.clone())

    # ------------------------------------------------------------------------- views --
    def __getitem__(self, layer: int) -> VLMKeyValueCacheEntry:
        return self.entries[layer]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def length(self) -> int:
        """Positions cached so far (TL's ``get_pos_offset``)."""
        return self.input_ids.shape[1]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def key_padding(self) -> Bool[Tensor, "batch pos"] | None:
        """``[batch, pos]`` True for real tokens, or None when every token is real."""
        real = self.previous_attention_mask.bool()
        return None if bool(real.all()) else real

    def reserve(self, n_positions: int) -> None:
        """Allocate room for ``n_positions`` positions in every layer (e.g. prompt +
        ``max_new_tokens``), so that no append reallocates."""
        for e in self.entries:
            e.reserve(n_positions)

    # --------------------------------------------------------------- TL compatibility --
    def freeze(self) -> None:
        self.frozen = True
        for e in self.entries:
            e.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for e in self.entries:
            e.frozen = False

    def append_attention_mask(self, attention_mask: Int[Tensor, "batch new"]) -> Tensor:
        """``previous_attention_mask`` with ``attention_mask`` appended (kept unless frozen)."""
        out = torch.cat([self.previous_attention_mask, attention_mask.to(self.previous_attention_mask)], dim=-1)
        if not self.frozen:
            self.previous_attention_mask = out
        return out

    # ------------------------------------------------------------ forks and batches --
    def fork(self) -> "VLMKeyValueCache":
        """An independent copy (continue it without touching this one)."""
        return self.select_rows(torch.arange(self.batch_size, device=self.input_ids.device))

    def select_rows(self, rows: Int[Tensor, " n"] | list[int]) -> "VLMKeyValueCache":
        """A new cache holding rows ``rows`` of this one, in that order (repeats allowed:
        e.g. one prefilled prefix expanded to several conditions along the batch).
        Image spans keep their image index (the feature order of the original batch)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        spans = [replace(s, row=new) for new, old in enumerate(rows.tolist()) for s in self.spans if s.row == old]

        def pick(t):
            return None if t is None else t.index_select(0, rows)

        return VLMKeyValueCache(
            entries=[e.select_rows(rows) for e in self.entries],
            previous_attention_mask=pick(self.previous_attention_mask), input_ids=pick(self.input_ids),
            spans=spans, block_ids=pick(self.block_ids), next_position=pick(self.next_position),
            position_rows=self.position_rows, allow_image_token_ids=self.allow_image_token_ids)

    def repeat_interleave(self, n: int) -> "VLMKeyValueCache":
        """Every row repeated ``n`` times in place (``[a, b] -> [a, a, b, b]`` for n=2)."""
        return self.select_rows(torch.arange(self.batch_size).repeat_interleave(n))

    # ------------------------------------------------------------ forward bookkeeping --
    def record(self, inputs: PreparedInputs, attention_mask: Tensor | None, prefill: bool) -> None:
        """After a forward over ``inputs`` (its new tokens' ``attention_mask``, None = all
        real): keep its tokens, mask, blocks and next positions (not if frozen). A prefill
        also stores its image spans."""
        if self.frozen:
            return
        ids, position_ids = inputs.input_ids, inputs.position_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
        pos = position_ids if position_ids.ndim == 2 else position_ids.max(0).values  # [batch, new]
        last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values + 1
        self.next_position = last if self.next_position is None else torch.maximum(self.next_position, last)
        if prefill:
            self.position_rows = position_ids.shape[0] if position_ids.ndim == 3 else None
            self.spans = list(inputs.spans)
        if prefill and inputs.block_ids is not None:
            old = torch.full_like(self.input_ids, -1)
            self.block_ids = torch.cat([old, inputs.block_ids], dim=1)
        elif self.block_ids is not None:
            self.block_ids = torch.cat([self.block_ids, torch.full_like(ids, -1)], dim=1)
        self.input_ids = torch.cat([self.input_ids, ids], dim=1)
        self.previous_attention_mask = torch.cat([self.previous_attention_mask, mask], dim=1)

    _STATE = ("previous_attention_mask", "input_ids", "spans", "block_ids", "next_position", "position_rows")

    def snapshot(self) -> dict:
        """What `rollback` restores (references: a forward replaces these, never edits them)."""
        return {name: getattr(self, name) for name in self._STATE}

    def rollback(self, state: dict) -> None:
        """Undo a failed forward: restore ``state`` (`snapshot`) and drop what the entries
        appended beyond it."""
        for name, value in state.items():
            setattr(self, name, value)
        for e in self.entries:
            e.truncate(state["input_ids"].shape[1])

    def continuation_inputs(self, cfg, input_ids: Tensor, attention_mask: Tensor | None, device,
                            **image_inputs) -> tuple[PreparedInputs, Tensor]:
        """Validate a continuation (text tokens after what is cached) and build its inputs:
        ``(PreparedInputs, attention_mask [batch, new])``. The prepared ``key_padding`` and
        ``block_ids`` cover every key (``[batch, cached + new]``); positions continue from
        each row's `next_position` over the new real tokens."""
        check_input_ids(input_ids)
        ids = input_ids.to(device)
        b, n = ids.shape
        if b != self.batch_size:
            raise ValueError(f"the KV cache holds {self.batch_size} rows but input_ids has {b}")
        given = [k for k, v in image_inputs.items() if v is not None and k != "token_type_ids"]
        if given:
            raise ValueError(f"a KV-cache continuation takes text tokens only, got {given}: the images "
                             "were encoded in the prefill (pass them with the prompt)")
        for tok, what in ((cfg.image_token_id, "image"), (cfg.video_token_id, "video")):
            if tok is not None and not self.allow_image_token_ids and bool((ids == tok).any()):
                raise ValueError(f"a KV-cache continuation holds {what} tokens (id {tok}); images go in the "
                                 "prefill (run the prompt with its images into an empty cache)")
        types = image_inputs.get("token_type_ids")
        if types is not None and bool(types[:, -n:].to(device).bool().any()):
            raise ValueError("token_type_ids of a KV-cache continuation must be 0 (text tokens)")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask.to(device=device, dtype=torch.long)
            if mask.shape == (b, self.length + n) and self.length:
                if not torch.equal(mask[:, :self.length], self.previous_attention_mask.to(mask)):
                    raise ValueError("attention_mask covers the cached positions but differs from the cache's "
                                     "previous_attention_mask there")
                mask = mask[:, self.length:]
            elif mask.shape != (b, n):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; a continuation of {n} token(s) "
                                 f"over {self.length} cached takes [batch, {n}] or [batch, {self.length + n}]")
        real = mask.bool()
        pos = self.next_position.to(device)[:, None] + torch.cumsum(mask, dim=1) - 1
        pos = torch.where(real, pos, torch.zeros_like(pos))
        if self.position_rows is not None:
            pos = pos[None].expand(self.position_rows, b, n)
        key_padding = torch.cat([self.previous_attention_mask.to(device), mask], dim=1).bool()
        block_ids = None if self.block_ids is None else torch.cat(
            [self.block_ids.to(device), torch.full_like(ids, -1)], dim=1)
        prepared = PreparedInputs(ids, None if bool(key_padding.all()) else key_padding, [], pos, block_ids)
        return prepared, mask


def check_cached_forward(return_type, start_at_layer, stop_at_layer, offset: int) -> None:
    """Raise for the forward options a KV cache cannot serve: a partial stack of layers
    (every layer's entry must grow together) and a loss over a continuation (it needs the
    whole sequence)."""
    if start_at_layer is not None or stop_at_layer is not None:
        raise ValueError("start_at_layer / stop_at_layer cannot run with past_kv_cache: the cache needs every "
                         "layer's keys and values; run the partial stack without the cache")
    if offset and return_type in ("loss", "both"):
        raise ValueError(f"return_type={return_type!r} over a KV-cache continuation is not supported: the loss "
                         "needs the whole sequence; run it without past_kv_cache")


def keeps_positions(forward):
    """Decorates `HookedVLM.forward`: publishes the forward's positions for the hooks
    (`mechvlm.forward_positions`; a non-empty ``past_kv_cache`` makes it a continuation at
    offset ``cache.length``) and rolls the cache back if the forward raises."""

    @functools.wraps(forward)
    def wrapper(self, *args, past_kv_cache: VLMKeyValueCache | None = None, **kwargs):
        if past_kv_cache is None:
            with forward_positions(0):
                return forward(self, *args, **kwargs)
        offset, state = past_kv_cache.length, past_kv_cache.snapshot()
        try:
            with forward_positions(offset, continuation=True if offset else None):
                return forward(self, *args, past_kv_cache=past_kv_cache, **kwargs)
        except BaseException:
            past_kv_cache.rollback(state)
            raise

    return wrapper
