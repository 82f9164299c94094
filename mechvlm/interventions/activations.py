"""Activation-level interventions: head ablation, activation patching, sublayer skipping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.interventions._common import Hooks, OnDevice, head_selector, layer_names

# Hooks whose layout is [batch, head, query, key]: positions select queries (dim 2).
_QUERY_DIM_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_attn_mask")


def _position_selector(positions: Tensor | Iterable[int] | None, act: Tensor, name: str) -> Tensor | None:
    """A boolean tensor broadcastable to ``act`` that selects the given positions."""
    if positions is None:
        return None
    pos_dim = 2 if name.endswith(_QUERY_DIM_HOOKS) else 1
    if act.ndim <= pos_dim:
        raise ValueError(f"'{name}' has no position axis; patch it without positions")
    n = act.shape[pos_dim]
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape != (act.shape[0], n):
            raise ValueError(f"positions mask {tuple(positions.shape)} does not match [batch, pos] = "
                             f"{(act.shape[0], n)} at '{name}'")
        sel = positions.to(act.device)
    else:
        idx = torch.as_tensor(list(positions) if not isinstance(positions, Tensor) else positions)
        sel = torch.zeros(n, dtype=torch.bool)
        sel[idx] = True
        sel = sel.to(act.device).expand(act.shape[0], n)
    shape = [act.shape[0]] + [1] * (act.ndim - 1)
    shape[pos_dim] = n
    if pos_dim == 2:
        return sel[:, None, :, None].expand(act.shape[0], 1, n, 1).reshape(shape)
    return sel.reshape(shape)


def ablate_heads(
    layers_heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]],
    mode: str = "zero",
    means: Mapping[int, Float[Tensor, "head d_head"]] | None = None,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> Hooks:
    """Ablate attention heads at ``hook_z`` (their value-weighted output, before ``W_O``).

    Args:
        layers_heads: ``{layer: [heads]}`` or ``[(layer, head), ...]``.
        mode: ``"zero"`` or ``"mean"`` (replace with ``means[layer][head]``, e.g. from
            `mean_head_outputs` over a reference set).
        positions: optional ``[batch, pos]`` mask of the query positions to ablate
            (default: all).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablate_heads mode must be 'zero' or 'mean', got {mode!r}")
    if not isinstance(layers_heads, Mapping):
        grouped: dict[int, list[int]] = {}
        for l, h in layers_heads:
            grouped.setdefault(int(l), []).append(int(h))
        layers_heads = grouped
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means={layer: [head, d_head] tensor}")
    hooks: Hooks = []
    for layer, heads in layers_heads.items():
        head_list = head_selector(heads)
        if mode == "mean" and layer not in means:
            raise ValueError(f"no mean head outputs for layer {layer}")

        def ablate(z: Tensor, hook, heads=head_list, layer=layer) -> Tensor:
            if max(heads) >= z.shape[2]:
                raise ValueError(f"head {max(heads)} does not exist in layer {layer} ({z.shape[2]} heads)")
            sel = torch.zeros(z.shape[2], dtype=torch.bool, device=z.device)[None, None, :, None]
            sel[..., heads, :] = True
            pos = _position_selector(positions, z, hook.name)
            if pos is not None:
                sel = sel & pos
            value = z.new_zeros(()) if mode == "zero" else means[layer].to(z)[None, None]
            return torch.where(sel, value, z)

        hooks.append((f"blocks.{layer}.attn.hook_z", ablate))
    return hooks


@torch.no_grad()
def mean_head_outputs(model, batches: Iterable[dict], layers: Iterable[int] | None = None) -> dict[int, Tensor]:
    """Mean of ``hook_z`` over all real tokens of ``batches``: ``{layer: [head, d_head]}``
    (the baseline of ``ablate_heads(mode="mean")``)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    sums = {l: 0.0 for l in layers}
    count = 0
    for batch in batches:
        am = batch.get("attention_mask")
        real = (am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool))
        real_on = OnDevice(real.to(model.device))  # moved once per device of a placed model

        def accumulate(z, hook):
            l = int(hook.name.split(".")[1])
            sums[l] = sums[l] + (z * real_on.get(z.device)[:, :, None, None]).sum((0, 1)).double()

        model.run_with_hooks(**batch, return_type=None,
                             fwd_hooks=[(f"blocks.{l}.attn.hook_z", accumulate) for l in layers])
        count += int(real.sum())
    return {l: (s / count).to(model.dtype) for l, s in sums.items()}


def patch_activations(
    clean_cache: Mapping[str, Tensor],
    hook_names: Iterable[str] | str,
    positions: Bool[Tensor, "batch pos"] | Iterable[int] | None = None,
) -> Hooks:
    """Activation patching: replace activations with the ones of a clean run.

    Args:
        clean_cache: an ``ActivationCache`` (or dict) from ``run_with_cache`` on the clean
            input, holding every name in ``hook_names``.
        hook_names: hook points to patch.
        positions: ``[batch, pos]`` mask or position indices (query positions for
            ``[batch, head, q, k]`` hooks); default: every position. Clean and corrupted
            inputs must have the same shape.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    for n in names:
        if n not in clean_cache:
            raise KeyError(f"the clean cache has no '{n}'; cache it with run_with_cache first")

    def patch(act: Tensor, hook) -> Tensor:
        clean = clean_cache[hook.name].to(act)
        if clean.shape != act.shape:
            raise ValueError(f"clean '{hook.name}' has shape {tuple(clean.shape)}, the run has "
                             f"{tuple(act.shape)}: clean and corrupted inputs must align")
        sel = _position_selector(positions, act, hook.name)
        return clean if sel is None else torch.where(sel, clean, act)

    return [(n, patch) for n in names]


def skip_sublayers(
    positions: Bool[Tensor, "batch pos"],
    layers: Iterable[int] | int | None = None,
    which: Iterable[str] | str = ("attn", "mlp"),
) -> Hooks:
    """Skip the attention and/or MLP sublayers at ``positions`` (EmbedLens): their output
    is zeroed there, so the residual stream passes through those layers unchanged."""
    which = (which,) if isinstance(which, str) else tuple(which)
    if not set(which) <= {"attn", "mlp"} or not which:
        raise ValueError(f"which must name 'attn' and/or 'mlp', got {which}")
    if positions.dtype != torch.bool or positions.ndim != 2:
        raise ValueError("positions must be a [batch, pos] boolean mask (e.g. roles.image)")
    pos = OnDevice(positions)

    def zero_out(out: Tensor, hook) -> Tensor:
        if tuple(positions.shape) != tuple(out.shape[:2]):
            raise ValueError(f"skip_sublayers: positions mask {tuple(positions.shape)} does not match "
                             f"[batch, pos] = {tuple(out.shape[:2])} at '{hook.name}' (it was built for "
                             "another batch)")
        return out.masked_fill(pos.get(out.device)[:, :, None], 0.0)

    hooks: Hooks = []
    for part in which:
        hooks += [(name, zero_out) for name in layer_names(layers, f"hook_{part}_out")]
    return hooks
