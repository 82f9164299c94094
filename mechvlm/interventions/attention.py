"""Attention knockout between token roles (seed 000, Eq. 3-4)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechvlm.interventions._common import Hooks, OnDevice, head_selector, layer_names
from mechvlm.roles import RoleSpec, TokenRoles

KNOCKOUT_MODES = ("post_softmax_zero", "pre_softmax_mask")


def _spec(spec: RoleSpec) -> str:
    """A role spec for messages: ``'text'``, ``['text', 'eoi']``, ``<mask [1, 18]>``."""
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, Tensor):
        return f"<mask {list(spec.shape)}>"
    return "[" + ", ".join(_spec(s) for s in spec) + "]"


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
            the softmax with NO renormalisation (hooks ``hook_pattern``, so the targeted
            layers materialise their pattern). ``"pre_softmax_mask"``: the entries are
            removed from the attention mask before the softmax, so each row renormalises
            over the keys left; it edits ``hook_attn_mask`` and runs through SDPA without
            materialising any pattern.

    Returns:
        ``[(hook_name_or_filter, fn), ...]`` for ``run_with_hooks``.
    """
    if mode not in KNOCKOUT_MODES:
        raise ValueError(f"unknown knockout mode {mode!r}; choose one of {KNOCKOUT_MODES}")
    pairs = OnDevice(role_pairs(roles, query, key))
    head_list = head_selector(heads)
    label = f"knockout(query={_spec(query)}, key={_spec(key)})"

    if mode == "post_softmax_zero":
        def zero_pattern(pattern: Tensor, hook) -> Tensor:
            roles.check_runs_on(pattern.shape[0], pattern.shape[-1], where=hook.name, used_by=label)
            cut = blocked_entries(pairs.get(pattern.device), head_list, pattern.shape[1])
            return pattern.masked_fill(cut, 0.0)

        return [(name, zero_pattern) for name in layer_names(layers, "attn.hook_pattern")]

    def mask_out(mask: Tensor, hook) -> Tensor:
        roles.check_runs_on(mask.shape[0], mask.shape[-1], where=hook.name, used_by=label)
        cut = blocked_entries(pairs.get(mask.device), head_list, hook.n_heads)
        return mask & ~cut

    return [(name, mask_out) for name in layer_names(layers, "attn.hook_attn_mask")]
