"""Interventions whose selection differs from batch row to batch row.

Many-intervention analyses (head attribution, causal tracing) put several interventions in
one forward: the batch holds ``copies`` copies of ``ex`` examples, block after block (row
``c * ex + e`` is copy ``c`` of example ``e``), and each row carries its own selection.
Replacement tensors are given once per example (``[ex, ...]``) and broadcast over the
copies, so no ``[copies * ex, ...]`` replacement is ever built.

* `ablate_head_outputs`: mean-ablate the output (``hook_z``) of the heads a row selects.
* `ablate_image_kv`: replace a head's image key/value pairs with a baseline, per KV head
  (``unit="kv_head"``, at ``hook_k`` / ``hook_v``, SDPA path) or per query head
  (``unit="query_head"``: the pairs as that one query head sees them, see below).
* `replace_where`: take given values (e.g. a clean run's activations, broadcast over the
  copies) where a per-example or per-row selection says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.interventions._common import Hooks

KV_UNITS = ("query_head", "kv_head")


def _by_copy(act: Tensor, ex: int) -> Tensor:
    """``[copies * ex, ...]`` -> ``[copies, ex, ...]`` (a view)."""
    if act.shape[0] % ex:
        raise ValueError(f"a batch of {act.shape[0]} rows is not a whole number of copies of {ex} examples")
    return act.view(act.shape[0] // ex, ex, *act.shape[1:])


def _check_rows(ablated: Tensor, name: str) -> None:
    if ablated.dtype != torch.bool or ablated.ndim != 3:
        raise ValueError(f"{name} must be a bool [batch, layer, head] tensor, got {ablated.dtype} "
                         f"{tuple(ablated.shape)}")


def ablate_head_outputs(ablated: Bool[Tensor, "batch layer head"],
                        means: Mapping[int, Float[Tensor, "head d_head"]]) -> Hooks:
    """Row ``b`` replaces ``hook_z`` of head ``h`` of layer ``l`` at every position with
    ``means[l][h]`` (e.g. `mean_head_outputs` over a reference set) where ``ablated[b, l, h]``."""
    _check_rows(ablated, "ablated")
    hooks: Hooks = []
    for layer in range(ablated.shape[1]):
        sel_l = ablated[:, layer]
        if not bool(sel_l.any()):
            continue
        if layer not in means:
            raise ValueError(f"no mean head outputs for layer {layer}")

        def ablate(z: Tensor, hook, sel=sel_l, layer=layer) -> Tensor:
            if sel.shape[0] != z.shape[0] or sel.shape[1] != z.shape[2]:
                raise ValueError(f"ablated has rows x heads {tuple(sel.shape)}, '{hook.name}' has batch "
                                 f"{z.shape[0]} and {z.shape[2]} heads")
            return torch.where(sel.to(z.device)[:, None, :, None], means[layer].to(z)[None, None], z)

        hooks.append((f"blocks.{layer}.attn.hook_z", ablate))
    return hooks


def ablate_image_kv(
    ablated: Bool[Tensor, "batch layer head"],
    image: Bool[Tensor, "ex pos"],
    key: Mapping[int, Float[Tensor, "ex pos kv_head d_head"]],
    value: Mapping[int, Float[Tensor, "ex pos kv_head d_head"]],
    *,
    unit: str = "query_head",
    attn_scale: float | None = None,
) -> Hooks:
    """Replace the image key/value pairs of selected heads with a baseline.

    Args:
        ablated: per row, which heads lose their image K/V: ``[batch, layer, kv_head]``
            for ``unit="kv_head"``, ``[batch, layer, head]`` for ``unit="query_head"``.
        image: ``[ex, pos]`` the image positions of each example.
        key, value: per layer the baseline placed on each example's positions (only the
            image positions are read). ``unit="kv_head"``: pre-RoPE keys (``hook_k``), the
            model rotates them at their positions; ``unit="query_head"``: post-RoPE keys.
        unit: under GQA one KV head serves several query heads, and a query head has no
            image K/V of its own in the model's tensors. ``"kv_head"`` edits ``hook_k`` /
            ``hook_v`` of the KV head (every query head of its group is affected; runs on
            SDPA). ``"query_head"`` makes exactly one query head see the baseline pairs
            while the others of its group keep the real ones: the image columns of its
            scores become ``q . k_baseline * scale`` (``hook_attn_scores``) and its output
            gets ``sum_j A_ij (v_baseline_j - v_j)`` over the image keys (``hook_z``), which
            equals attention over the edited pairs; the layers it touches materialise their
            pattern.
        attn_scale: the model's score scale (``model.cfg.attn_scale``), for ``"query_head"``.
    """
    if unit not in KV_UNITS:
        raise ValueError(f"unit must be one of {KV_UNITS}, got {unit!r}")
    if unit == "query_head" and attn_scale is None:
        raise ValueError("unit='query_head' needs attn_scale=model.cfg.attn_scale")
    _check_rows(ablated, "ablated")
    ex = image.shape[0]
    hooks: Hooks = []
    for layer in range(ablated.shape[1]):
        sel_l = ablated[:, layer]
        if not bool(sel_l.any()):
            continue
        if layer not in key or layer not in value:
            raise ValueError(f"no baseline keys/values for layer {layer}")
        hooks += (_kv_head_hooks if unit == "kv_head" else _query_head_hooks)(
            layer, sel_l, image, key[layer], value[layer], ex, attn_scale)
    return hooks


def _kv_head_hooks(layer, sel, image, k_base, v_base, ex, scale=None) -> Hooks:
    def replace(base):
        def hook(act: Tensor, hook) -> Tensor:  # [batch, pos, kv, d]
            if sel.shape[1] != act.shape[2]:
                raise ValueError(f"unit='kv_head' needs ablated [batch, layer, kv_head] with {act.shape[2]} KV "
                                 f"heads at '{hook.name}', got {sel.shape[1]}")
            where = _by_copy(sel.to(act.device), ex)[:, :, None, :, None] & image.to(act.device)[None, :, :, None, None]
            out = torch.where(where, base.to(act)[None], _by_copy(act, ex))
            return out.reshape(act.shape)
        return hook

    return [(f"blocks.{layer}.attn.hook_k", replace(k_base)), (f"blocks.{layer}.attn.hook_v", replace(v_base))]


def _query_head_hooks(layer, sel, image, k_base, v_base, ex, scale) -> Hooks:
    seen: dict[str, Tensor] = {}
    p = f"blocks.{layer}.attn."

    def keep(name):
        def hook(act: Tensor, hook) -> None:
            seen[name] = act
        return hook

    def scores_hook(scores: Tensor, hook) -> Tensor:  # [batch, head, q, k]
        q = seen.pop("q")  # [batch, pos, head, d]
        n_heads, n_kv = q.shape[2], k_base.shape[2]
        if sel.shape[1] != n_heads:
            raise ValueError(f"unit='query_head' needs ablated [batch, layer, head] with {n_heads} heads at "
                             f"'{hook.name}', got {sel.shape[1]}")
        kb = k_base.to(q).repeat_interleave(n_heads // n_kv, dim=2)  # [ex, pos, head, d]
        qb = _by_copy(q, ex)
        base = torch.einsum("cexhd,ekhd->cehxk", qb, kb) * scale  # [copies, ex, head, q, k]
        cut = _by_copy(sel.to(q.device), ex)[:, :, :, None, None] & image.to(q.device)[None, :, None, None, :]
        cut = cut & (_by_copy(scores, ex) > torch.finfo(scores.dtype).min)  # keep masked entries masked
        return torch.where(cut, base.to(scores), _by_copy(scores, ex)).reshape(scores.shape)

    def z_hook(z: Tensor, hook) -> Tensor:  # [batch, pos, head, d]
        pattern, v = seen.pop("pattern"), seen.pop("v")  # [batch, head, q, k], [batch, pos, kv, d]
        n_heads = z.shape[2]
        delta = (v_base.to(v)[None] - _by_copy(v, ex)) * image.to(v.device)[None, :, :, None, None]
        delta = delta.repeat_interleave(n_heads // v.shape[2], dim=3)  # [copies, ex, pos, head, d]
        delta = delta * _by_copy(sel.to(z.device), ex)[:, :, None, :, None]
        fix = torch.einsum("cehqk,cekhd->ceqhd", _by_copy(pattern, ex), delta)
        return (_by_copy(z, ex) + fix).reshape(z.shape)

    return [(p + "hook_rot_q", keep("q")), (p + "hook_v", keep("v")), (p + "hook_attn_scores", scores_hook),
            (p + "hook_pattern", keep("pattern")), (p + "hook_z", z_hook)]


def replace_where(values: Mapping[str, Tensor], where: Mapping[str, Tensor]) -> Hooks:
    """At each hook ``name``, take ``values[name]`` (``[ex, ...]`` like the activation of
    ``ex`` examples, broadcast over the copies) where ``where[name]`` is True. ``where``
    is bool, either one selection per example (``[ex, ...]``, broadcastable to
    ``values[name]``) or one per batch row (``[copies * ex, ...]``): e.g. clean activations
    restored at the positions each row chooses, or keys replaced at chosen KV heads."""
    hooks: Hooks = []
    for name, value in values.items():
        if name not in where:
            raise KeyError(f"no selection for '{name}'")

        def edit(act: Tensor, hook, value=value, sel=where[name]) -> Tensor:
            ex = value.shape[0]
            if _by_copy(act, ex).shape[1:] != value.shape:
                raise ValueError(f"replacement {tuple(value.shape)} does not match '{hook.name}' "
                                 f"{tuple(act.shape)} (copies of {ex} examples)")
            sel_d = sel.to(act.device)
            sel_d = _by_copy(sel_d, ex) if sel_d.shape[0] == act.shape[0] else sel_d[None]
            return torch.where(sel_d, value.to(act)[None], _by_copy(act, ex)).reshape(act.shape)

        hooks.append((name, edit))
    return hooks
