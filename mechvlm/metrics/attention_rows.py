"""The attention rows of a query set, streamed layer by layer (no full pattern).

`QueryAttention` turns a forward pass into, per layer, the attention mass that a set of
query tokens sends to every key: ``mass[b, h, j] = sum_{i in Q_b} A^{l,h}_{b,i,j}``.
Both `attention_share` and `received_attention` reduce this tensor.

How a layer is read (decided per layer before the forward):

* Streaming (the default): hooks at ``hook_rot_q`` / ``hook_rot_k`` keep references to the
  post-RoPE queries and keys; the hook at ``hook_attn_mask`` (which fires right after them)
  computes ``softmax(q[Q] k^T * scale)`` under the layer's boolean mask for the query rows
  only (the union of ``Q`` over the batch, in chunks), in fp32, and reduces it. The model
  itself keeps running SDPA; no ``[q, k]`` pattern of the layer is materialised.
* Pattern: when other hooks of the same run (or hooks already attached to the model)
  touch ``hook_attn_scores`` / ``hook_pattern`` of the layer, the model materialises the
  pattern anyway and the metric reads the real (edited) one at ``hook_pattern``. A
  post-softmax knockout (a `PostSoftmaxCut` at ``hook_pattern``) does not count: the layer
  stays pattern-free and the streamed rows get the same zeros.

Metric hooks go AFTER the user's hooks in the hook list, so at a shared hook point they fire
last and see every edit: a mask edited at ``hook_attn_mask`` (pre-softmax knockout,
register masks), edited queries/keys, an edited pattern.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechvlm.components.post_softmax import PostSoftmaxCut, softmax_rows
from mechvlm.interventions._common import OnDevice
from mechvlm.metrics._common import Hooks, chunk_rows, hook_matches

_PATTERN_POINTS = ("attn.hook_attn_scores", "attn.hook_pattern")


def query_attention_rows(
    q: Float[Tensor, "batch query head d_head"],
    k: Float[Tensor, "batch key kv_head d_head"],
    allowed: Bool[Tensor, "batch one_or_head query key"],
    scale: float,
) -> Float[Tensor, "batch head query key"]:
    """Post-softmax attention rows of the given queries, in fp32 (`softmax_rows` for the
    TransformerLens ``[batch, pos, head, d_head]`` layout of ``hook_rot_q`` / ``hook_rot_k``).

    ``softmax(q . k^T * scale)`` with disallowed keys removed; grouped-query attention maps
    query head ``h`` to key head ``h // (n_heads / n_kv_heads)`` (as ``repeat_kv``); a row
    with no allowed key is all zero (as the model's SDPA and explicit paths return it).
    """
    return softmax_rows(q.transpose(1, 2), k.transpose(1, 2), allowed, scale)


def _materialises(hook: tuple) -> bool:
    """A hook that makes a layer materialise its pattern (a `PostSoftmaxCut` does not)."""
    return not isinstance(hook[1], PostSoftmaxCut)


def reads_pattern(model, layer: int, hooks: Hooks) -> bool:
    """True when the layer will materialise its pattern in this run: a hook of ``hooks`` (or
    one already attached to the model) sits at its ``hook_attn_scores`` / ``hook_pattern``,
    other than the `PostSoftmaxCut` edits a layer applies without a pattern."""
    if model.blocks[layer].attn.needs_pattern():
        return True
    names = [f"blocks.{layer}.{p}" for p in _PATTERN_POINTS]
    return any(hook_matches(h[0], n) and _materialises(h) for h in hooks for n in names)


class QueryAttention:
    """Hooks that compute, for one batch, the attention mass from a query set to every key.

    Args:
        model: the `HookedVLM`.
        layers: the layers to read.
        query_mask: ``[batch, pos]`` the query tokens ``Q`` of each row.
        reduce: ``reduce(layer, mass)`` with ``mass`` ``[batch, head, key]`` fp32 (the summed
            rows of ``Q``, on the layer's device), called once per layer during the forward;
            what it returns is kept in ``self.results[layer]`` (keep it small).
        other_hooks: the user's hooks of the same run (decides streaming vs pattern layers).
        query_chunk: query rows per chunk (default: see `chunk_rows`, the MLP activation
            budget).
        kv_cache: the `mechvlm.kv_cache.VLMKeyValueCache` the forward runs with (a prefill
            into it, or a continuation over it). A continuation holds only the new positions:
            ``query_mask`` then covers those (``[batch, new_pos]``), ``hook_rot_k`` sees only the
            new keys, so the earlier keys are read from the cache entry; ``mass`` covers every
            key (``cached + new_pos``). Post-softmax cuts and ``hook_pattern`` already see
            ``[batch, head, new_pos, cached + new_pos]`` (the queries are the last ones).

    Use: ``run_with_hooks(fwd_hooks=other_hooks + qa.hooks())`` (plus ``past_kv_cache=kv_cache``).
    """

    def __init__(self, model, layers: list[int], query_mask: Bool[Tensor, "batch pos"],
                 reduce: Callable[[int, Tensor], Tensor], other_hooks: Hooks = (),
                 query_chunk: int | None = None, kv_cache=None):
        if query_chunk is not None and (isinstance(query_chunk, bool) or int(query_chunk) != query_chunk
                                        or query_chunk < 1):
            raise ValueError(f"query_chunk must be a positive number of query rows (or None), got {query_chunk!r}")
        self.model = model
        self.layers = list(layers)
        self.reduce = reduce
        query_mask = query_mask.to(model.device)
        b, n = query_mask.shape
        self.qpos: Int[Tensor, " query"] = query_mask.any(0).nonzero().squeeze(-1)
        self.qsel: Float[Tensor, "batch query"] = query_mask[:, self.qpos].float()
        # on each layer's device, moved once per device (a model placed over devices)
        self._qpos, self._qsel = OnDevice(self.qpos), OnDevice(self.qsel)
        self.kv_cache, self.n_pos = kv_cache, n
        n_keys = n + (kv_cache.length if kv_cache is not None else 0)
        self.chunk = query_chunk or chunk_rows(model, b * n, b * model.cfg.n_heads * n_keys)
        self.pattern_layers = {l for l in self.layers if reads_pattern(model, l, list(other_hooks))}
        self.results: dict[int, Tensor] = {}
        self._q: dict[int, Tensor] = {}
        self._k: dict[int, Tensor] = {}

    def hooks(self) -> Hooks:
        out: Hooks = []
        for l in self.layers:
            pre = f"blocks.{l}.attn."
            if l in self.pattern_layers:
                out.append((pre + "hook_pattern", self._pattern_hook(l)))
            else:
                out += [(pre + "hook_rot_q", self._keep(self._q, l)),
                        (pre + "hook_rot_k", self._keep(self._k, l)),
                        (pre + "hook_attn_mask", self._mask_hook(l))]
        return out

    # --------------------------------------------------------------------------- hooks --
    @staticmethod
    def _keep(store: dict, layer: int):
        def keep(t: Tensor, hook) -> None:
            store[layer] = t

        return keep

    def _mask_hook(self, layer: int):
        attn = self.model.blocks[layer].attn

        def on_mask(allowed: Tensor, hook) -> None:
            self._check_queries(allowed, hook)
            q, k = self._q.pop(layer), self._all_keys(layer, self._k.pop(layer), allowed.shape[-1], hook)
            cut = None  # post-softmax knockouts of this layer, applied without a pattern
            for c in attn.post_softmax_cuts() or ():
                part = c.cut(allowed.shape[0], attn.n_heads, allowed.shape[2], allowed.shape[3], allowed.device,
                             attn.hook_pattern.name)
                cut = part if cut is None else cut | part
            qpos = self._qpos.get(q.device)
            mass = None
            for s in range(0, len(qpos), self.chunk):
                idx = qpos[s:s + self.chunk]
                rows = query_attention_rows(q[:, idx], k, allowed[:, :, idx], attn.scale)
                if cut is not None:
                    rows = rows.masked_fill(cut[:, :, idx], 0.0)
                mass = self._add(mass, rows, s, len(idx))
            self._finish(layer, mass, q.shape[0], allowed.shape[-1], q.device)

        return on_mask

    def _pattern_hook(self, layer: int):
        def on_pattern(pattern: Tensor, hook) -> None:
            self._check_queries(pattern, hook)
            qpos = self._qpos.get(pattern.device)
            mass = None
            for s in range(0, len(qpos), self.chunk):
                idx = qpos[s:s + self.chunk]
                mass = self._add(mass, pattern[:, :, idx].float(), s, len(idx))
            self._finish(layer, mass, pattern.shape[0], pattern.shape[-1], pattern.device)

        return on_pattern

    def _check_queries(self, act: Tensor, hook) -> None:
        if act.shape[2] != self.n_pos or act.shape[0] != self.qsel.shape[0]:
            raise ValueError(f"QueryAttention: the query mask is [batch, pos] = {(self.qsel.shape[0], self.n_pos)} "
                             f"but the forward at '{hook.name}' has {act.shape[0]} rows and {act.shape[2]} query "
                             "positions (over a KV cache, give the mask over the new positions)")

    def _all_keys(self, layer: int, new: Tensor, n_keys: int, hook) -> Float[Tensor, "batch key kv_head d_head"]:
        """Every key the layer attends: ``new`` (``hook_rot_k``'s) after the cached ones."""
        if new.shape[1] == n_keys:
            return new
        if self.kv_cache is None:
            raise ValueError(f"QueryAttention: '{hook.name}' has {n_keys} keys but hook_rot_k saw {new.shape[1]}: "
                             "a forward over a KV cache; pass kv_cache= (the cache holds the earlier keys)")
        old = self.kv_cache[layer].past_keys[:, :n_keys - new.shape[1]]  # the new ones may be appended already
        return torch.cat([old.to(new.dtype), new], dim=1)

    def _add(self, mass: Tensor | None, rows: Float[Tensor, "batch head c key"], s: int, c: int) -> Tensor:
        # sum the chunk's rows, each weighted by whether it is a query of that batch row
        part = torch.einsum("bhck,bc->bhk", rows, self._qsel.get(rows.device)[:, s:s + c])
        return part if mass is None else mass + part

    def _finish(self, layer: int, mass: Tensor | None, b: int, n: int, device: torch.device) -> None:
        if mass is None:  # no query token in the batch
            mass = torch.zeros(b, self.model.cfg.n_heads, n, device=device)
        self.results[layer] = self.reduce(layer, mass)
