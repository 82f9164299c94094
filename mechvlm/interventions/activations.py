"""Activation-level interventions: head ablation, activation patching, sublayer skipping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.interventions._common import (
    Hooks,
    OnDevice,
    PositionSelection,
    head_selector,
    layer_names,
    pattern_query_range,
    token_query_range,
)

# Hooks whose layout is [batch, head, query, key]: positions select queries (dim 2).
_QUERY_DIM_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_attn_mask")


def _query_range(act: Tensor, name: str) -> tuple[int, int, int]:
    """``(pos_dim, start, stop)``: the position axis of ``act`` and the absolute positions it
    holds (a KV-cache step holds only the new ones; `mechvlm.forward_positions`)."""
    if name.endswith(_QUERY_DIM_HOOKS):
        if act.ndim != 4:
            raise ValueError(f"'{name}' has no [batch, head, query, key] layout here")
        return 2, *pattern_query_range(act)
    if act.ndim < 2:
        raise ValueError(f"'{name}' has no position axis; patch it without positions")
    return 1, *token_query_range(act.shape[1])


class _Positions:
    """The ``positions`` argument of the activation interventions, per forward: a
    ``[batch, pos]`` bool mask over absolute positions (`PositionSelection`: a KV-cache step
    reads the rows of its new tokens; a mask cannot extend to generated tokens), or absolute
    position indices (negative ones count from the end of the sequence so far)."""

    def __init__(self, positions: Tensor | Iterable[int], what: str):
        if isinstance(positions, Tensor) and positions.dtype == torch.bool:
            self.mask: PositionSelection | None = PositionSelection(positions, used_by=what)
            self.index = None
        else:
            self.mask = None
            self.index = torch.as_tensor(list(positions) if not isinstance(positions, Tensor) else positions).long()

    def span(self, start: int, stop: int, batch: int, device: torch.device, where: str) -> Bool[Tensor, "batch n"]:
        if self.mask is not None:
            return self.mask.span(start, stop, device, batch=batch, where=where)
        idx = torch.where(self.index < 0, self.index + stop, self.index)
        if bool((idx < 0).any()) or (not _continuing() and bool((idx >= stop).any())):
            raise IndexError(f"position indices {self.index.tolist()} out of range for a sequence of {stop}")
        sel = torch.zeros(stop, dtype=torch.bool)
        sel[idx[idx < stop]] = True
        return sel[start:].to(device).expand(batch, stop - start)


def _continuing() -> bool:
    from mechvlm.forward_positions import current

    return current().continuation


def _position_selector(positions: _Positions | None, act: Tensor, name: str) -> Tensor | None:
    """A boolean tensor broadcastable to ``act`` that selects the given positions."""
    if positions is None:
        return None
    pos_dim, start, stop = _query_range(act, name)
    n = stop - start
    sel = positions.span(start, stop, act.shape[0], act.device, name)
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
            (default: all). A mask of the prompt cannot cover generated tokens: in generation
            pass a callable ``(batch, roles) -> hooks`` (e.g. ``positions=roles.text``).
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
    sel_positions = None if positions is None else _Positions(positions, "ablate_heads positions")
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
            pos = _position_selector(sel_positions, z, hook.name)
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

    In generation (a KV-cache step, or `mechvlm.generation` without a cache) the clean
    activations are read by absolute position: a step patches the positions of its new
    tokens that the clean run covers; selecting a position the clean run does not have
    raises. Patching the prompt's positions (e.g. ``positions=roles.image``) therefore
    acts in the prefill, and through the KV cache on every later token.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    for n in names:
        if n not in clean_cache:
            raise KeyError(f"the clean cache has no '{n}'; cache it with run_with_cache first")
    sel_positions = None if positions is None else _Positions(positions, "patch_activations positions")

    def patch(act: Tensor, hook) -> Tensor:
        clean = clean_cache[hook.name].to(act)
        pos_dim, start, stop = _query_range(act, hook.name) if act.ndim >= 2 else (1, 0, 0)
        sel = _position_selector(sel_positions, act, hook.name)
        if clean.shape == act.shape and start == 0:
            return clean if sel is None else torch.where(sel, clean, act)
        if not _continuing() or act.ndim < 2:
            raise ValueError(f"clean '{hook.name}' has shape {tuple(clean.shape)}, the run has "
                             f"{tuple(act.shape)}: clean and corrupted inputs must align")
        return _patch_by_position(clean, act, sel, pos_dim, start, stop, hook.name)

    return [(n, patch) for n in names]


def _patch_by_position(clean: Tensor, act: Tensor, sel: Tensor | None, pos_dim: int, start: int, stop: int,
                       name: str) -> Tensor:
    """Patch the rows ``start .. stop-1`` of ``act`` (absolute positions) from ``clean``,
    which covers positions ``0 .. L-1``; selected rows the clean run lacks raise."""
    n = stop - start
    covered = max(0, min(stop, clean.shape[pos_dim]) - start)
    if sel is None:
        shape = [1] * act.ndim
        shape[pos_dim] = n
        sel = torch.ones(shape, dtype=torch.bool, device=act.device)
    wanted = sel.expand_as(act).narrow(pos_dim, covered, n - covered)
    if bool(wanted.any()):
        raise ValueError(f"patching '{name}' at position {start + covered} or later, but the clean run "
                         f"covers positions 0..{clean.shape[pos_dim] - 1}: patch positions of the clean "
                         "run only (e.g. the prompt's)")
    if covered == 0:
        return act
    rows = clean.narrow(pos_dim, start, covered)
    if pos_dim == 2:  # [batch, head, q, k]: the clean rows need this forward's keys
        if clean.shape[-1] < stop:
            raise ValueError(f"clean '{name}' has {clean.shape[-1]} keys, this forward {stop}")
        rows = rows[..., :stop]
    if rows.shape[:pos_dim] != act.shape[:pos_dim] or rows.shape[pos_dim + 1:] != act.shape[pos_dim + 1:]:
        raise ValueError(f"clean '{name}' has shape {tuple(clean.shape)}, the run has {tuple(act.shape)}: "
                         "clean and corrupted inputs must align")
    head = torch.where(sel.narrow(pos_dim, 0, covered), rows, act.narrow(pos_dim, 0, covered))
    return torch.cat([head, act.narrow(pos_dim, covered, n - covered)], dim=pos_dim)


def skip_sublayers(
    positions: Bool[Tensor, "batch pos"],
    layers: Iterable[int] | int | None = None,
    which: Iterable[str] | str = ("attn", "mlp"),
) -> Hooks:
    """Skip the attention and/or MLP sublayers at ``positions`` (EmbedLens): their output
    is zeroed there, so the residual stream passes through those layers unchanged. In a
    KV-cache step the mask's rows of the new tokens apply (a mask of the prompt cannot
    extend to generated tokens: pass a callable ``(batch, roles) -> hooks``)."""
    which = (which,) if isinstance(which, str) else tuple(which)
    if not set(which) <= {"attn", "mlp"} or not which:
        raise ValueError(f"which must name 'attn' and/or 'mlp', got {which}")
    if positions.dtype != torch.bool or positions.ndim != 2:
        raise ValueError("positions must be a [batch, pos] boolean mask (e.g. roles.image)")
    pos = PositionSelection(positions, used_by="skip_sublayers: positions mask")

    def zero_out(out: Tensor, hook) -> Tensor:
        start, stop = token_query_range(out.shape[1])
        sel = pos.span(start, stop, out.device, batch=out.shape[0], where=hook.name)
        return out.masked_fill(sel[:, :, None], 0.0)

    hooks: Hooks = []
    for part in which:
        hooks += [(name, zero_out) for name in layer_names(layers, f"hook_{part}_out")]
    return hooks
