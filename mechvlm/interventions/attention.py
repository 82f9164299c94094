"""Attention knockout between token roles (seed 000, Eq. 3-4)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechvlm.components.post_softmax import PostSoftmaxCut
from mechvlm.interventions._common import Hooks, PositionSelection, head_selector, layer_names, spec_label
from mechvlm.roles import RoleSpec, TokenRoles

KNOCKOUT_MODES = ("post_softmax_zero", "pre_softmax_mask")


def role_pairs(roles: TokenRoles, query: RoleSpec, key: RoleSpec) -> Bool[Tensor, "batch q k"]:
    """``[batch, q, k]``: True where a query of role ``query`` meets a key of role ``key``."""
    q, k = roles.mask(query), roles.mask(key)
    return q[:, :, None] & k[:, None, :]


def blocked_entries(pairs: Tensor, heads: list[int] | None, n_heads: int) -> Bool[Tensor, "batch h q k"]:
    """Broadcastable ``[batch, 1 | head, q, k]`` selection of the entries to cut."""
    if heads is None:
        return pairs[:, None]
    if max(heads) >= n_heads:
        raise ValueError(f"heads: head {max(heads)} does not exist (the layer has {n_heads} heads)")
    sel = torch.zeros(n_heads, dtype=torch.bool, device=pairs.device)
    sel[heads] = True
    return pairs[:, None] & sel[None, :, None, None]


class PairCut(PostSoftmaxCut):
    """The attention entries from ``query`` tokens to ``key`` tokens (optionally minus the
    ``exempt`` queries), sized for each forward: its queries are the last ``q`` of its ``k``
    key positions, so a KV-cache step (``q`` new tokens over ``k`` cached + new keys) gets
    the rows of its new tokens. Role names extend to generated tokens (`PositionSelection`).

    As a ``hook_pattern`` hook it zeroes the entries after the softmax (`PostSoftmaxCut`);
    `mask_out` removes them from a ``hook_attn_mask`` instead. The last cut is reused by the
    next layers of the same forward."""

    def __init__(self, query: PositionSelection, key: PositionSelection, heads: list[int] | None = None,
                 exempt: PositionSelection | None = None):
        self.query, self.key, self.heads, self.exempt = query, key, heads, exempt
        self._last: tuple | None = None

    def cut(self, batch: int, n_heads: int, n_queries: int, n_keys: int, device: torch.device,
            where: str = "") -> Tensor:
        from mechvlm.forward_positions import current
        from mechvlm.roles import running_ids

        running = running_ids()
        key = (batch, n_heads, n_queries, n_keys, device, current().continuation)
        if self._last is not None and self._last[0] == key and running is not None and self._last[1]() is running:
            return self._last[2]  # a later layer of the same forward: checked and built already
        start = n_keys - n_queries
        kw = dict(batch=batch, where=where)
        q = self.query.span(start, n_keys, device, **kw)  # checks the batch (issue 12)
        if self.exempt is not None:
            q = q & ~self.exempt.span(start, n_keys, device, **kw)
        pairs = q[:, :, None] & self.key.full(n_keys, device, start=start, **kw)[:, None, :]
        cut = blocked_entries(pairs, self.heads, n_heads)
        self._last = (key, (weakref.ref(running) if running is not None else (lambda: None)), cut)
        return cut

    def mask_out(self, mask: Tensor, hook) -> Tensor:
        """``hook_attn_mask`` edit: ``mask & ~cut``."""
        return mask & ~self.cut(mask.shape[0], hook.n_heads, mask.shape[-2], mask.shape[-1], mask.device, hook.name)


def knockout_reach(roles: TokenRoles, query: RoleSpec = "text", key: RoleSpec = "image") -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]``: the queries whose attention `knockout(roles, query, key)` can change
    (in some layer and head): the ``query`` tokens that see a ``key`` token, at an earlier or
    the same position, or anywhere in the same image (Gemma3 attends within an image
    bidirectionally; counted for Qwen too, which only makes the reach larger). A knockout
    changes nothing at the positions before a row's first such query (attention is causal),
    which is what lets several conditions share that prefix (`mechvlm.prefix_sharing`)."""
    q, k = roles.mask(query), roles.mask(key)
    sees = k.cumsum(-1) > 0
    for s in roles.spans:
        if bool(k[s.row, s.start:s.stop].any()):
            sees[s.row, s.start:s.stop] = True
    return q & sees


def knockout(
    roles: TokenRoles,
    query: RoleSpec = "text",
    key: RoleSpec = "image",
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
    mode: str = "post_softmax_zero",
) -> Hooks:
    """Cut attention from ``query`` tokens to ``key`` tokens.

    Args:
        roles: `HookedVLM.roles(...)` of the batch the hooks will run on.
        query, key: role names, boolean ``[batch, pos]`` masks, or lists of them (union).
        layers: layer indices (default: all layers).
        heads: head indices (default: all heads).
        mode: ``"post_softmax_zero"``: the seed's Eq. 3-4 as written, ``A_ij = 0`` after
            the softmax with NO renormalisation. It hooks ``hook_pattern`` with a
            `PostSoftmaxCut`: alone there, the layer runs SDPA over the kept keys and scales
            the rows that lost keys by the mass they kept, without materialising the pattern
            (same result; another hook at ``hook_pattern`` brings the explicit pattern back,
            and the cut then edits it in list order). ``"pre_softmax_mask"``: the entries are
            removed from the attention mask before the softmax, so each row renormalises
            over the keys left; it edits ``hook_attn_mask`` and runs through SDPA.

    In generation (a KV-cache step, or `mechvlm.generation` without a cache) the hooks
    cover the generated tokens: with role names, the roles extend to them (they are text
    after the image); with boolean masks, pass a callable ``(batch, roles) -> hooks``.

    Returns:
        ``[(hook_name_or_filter, fn), ...]`` for ``run_with_hooks``.
    """
    if mode not in KNOCKOUT_MODES:
        raise ValueError(f"unknown knockout mode {mode!r}; choose one of {KNOCKOUT_MODES}")
    label = f"knockout(query={spec_label(query)}, key={spec_label(key)})"
    cut = PairCut(PositionSelection(query, roles, label), PositionSelection(key, roles, label), head_selector(heads))
    if mode == "post_softmax_zero":
        return [(name, cut) for name in layer_names(layers, "attn.hook_pattern")]
    return [(name, cut.mask_out) for name in layer_names(layers, "attn.hook_attn_mask")]
