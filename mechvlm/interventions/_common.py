"""Helpers shared by the interventions: layer selection, per-device mask caches, and token
selections resolved for the positions of each forward (KV-cache steps included)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechvlm.roles import TokenRoles

Hooks = list[tuple[object, object]]


def layer_names(layers: Iterable[int] | int | None, suffix: str):
    """Hook names ``blocks.{l}.{suffix}`` for the given layers, or a filter for all layers."""
    if layers is None:
        return [(lambda name, s=suffix: name.startswith("blocks.") and name.endswith("." + suffix))]
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("an empty layer selection")
    return [f"blocks.{l}.{suffix}" for l in layers]


class OnDevice:
    """Caches a tensor per (device) so a hook moves it once, not once per layer."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._by_device: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device) -> Tensor:
        if device not in self._by_device:
            self._by_device[device] = self.tensor.to(device)
        return self._by_device[device]


def head_selector(heads: Iterable[int] | int | None) -> list[int] | None:
    if heads is None:
        return None
    if isinstance(heads, int):
        heads = [heads]
    heads = sorted(set(int(h) for h in heads))
    if not heads:
        raise ValueError("an empty head selection")
    return heads


# ----------------------------------------------------------- positions of a forward --
def _continuation_hint(what: str, built: int, total: int) -> str:
    return (f"{what} was built for {built} positions but this forward reaches position {total}: "
            "in a generation step, pass fwd_hooks as a callable (batch, roles) -> hooks so the "
            "hooks are rebuilt from each step's roles (or select tokens by role name)")


class PositionSelection:
    """A ``[batch, pos]`` token selection over absolute positions, resolved for the positions
    each forward covers (the new tokens of a KV-cache step, or the whole sequence).

    ``spec`` is a role name, a bool ``[batch, pos]`` mask, or a list of them (union), read
    through ``roles`` (`TokenRoles.mask`); without ``roles`` it must be a bool mask. A
    forward that reaches past the selection's positions is a continuation of the prompt
    (`mechvlm.forward_positions`): role names then extend to the generated tokens
    (`TokenRoles.extend`: they are text after the prompt); a selection holding a boolean
    mask cannot be extended and raises, naming the fix. A forward shorter than the
    selection raises too (the hooks were built for another batch).
    """

    def __init__(self, spec, roles: TokenRoles | None = None, what: str = "a token selection"):
        self.what = what
        if roles is None:
            if not isinstance(spec, Tensor) or spec.dtype != torch.bool or spec.ndim != 2:
                raise ValueError(f"{what} must be a [batch, pos] boolean mask")
            self.base, self.roles, self.spec = spec, None, None
        else:
            self.base, self.roles, self.spec = roles.mask(spec), roles, spec
        self.batch, self.length = self.base.shape
        self.extensible = roles is not None and _names_only(spec)
        self._last: tuple | None = None

    def full(self, total: int, device: torch.device) -> Bool[Tensor, "batch total"]:
        """The selection over absolute positions ``0 .. total-1``."""
        from mechvlm.forward_positions import current

        continuation = current().continuation
        key = (total, device, continuation)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if total == self.length:
            out = self.base
        elif total < self.length:
            raise ValueError(f"{self.what} was built for {self.length} positions but the forward has "
                             f"{total}: build the hooks from this batch's roles")
        elif not continuation:
            raise ValueError(f"{self.what} was built for {self.length} positions but the forward has "
                             f"{total}: build the hooks from this batch's roles")
        elif not self.extensible:
            raise ValueError(_continuation_hint(f"{self.what} (from a boolean mask)", self.length, total))
        else:
            out = self.roles.extend(total - self.length).mask(self.spec)
        out = out.to(device)
        self._last = (key, out)
        return out

    def span(self, start: int, stop: int, device: torch.device, batch: int | None = None) -> Bool[Tensor, "batch n"]:
        """The selection at absolute positions ``start .. stop-1``."""
        if batch is not None and batch != self.batch:
            raise ValueError(f"{self.what} has {self.batch} rows but the forward has {batch}")
        return self.full(stop, device)[:, start:stop]


def spec_label(spec) -> str:
    """A short name of a role spec for messages (``'text'``, ``'a boolean mask'``, ...)."""
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, Tensor):
        return "(a boolean mask)"
    return "[" + ", ".join(spec_label(s) for s in spec) + "]"


def _names_only(spec) -> bool:
    if isinstance(spec, str):
        return True
    if isinstance(spec, Tensor):
        return False
    return all(_names_only(s) for s in spec)


def pattern_query_range(act: Tensor) -> tuple[int, int]:
    """``(start, stop)`` absolute query positions of a ``[batch, head, q, k]`` activation:
    the queries are the last ``q`` of the ``k`` key positions."""
    q, k = act.shape[-2], act.shape[-1]
    return k - q, k


def token_query_range(n_new: int) -> tuple[int, int]:
    """``(start, stop)`` absolute positions of a ``[batch, pos, ...]`` activation with
    ``n_new`` positions in the forward now running."""
    from mechvlm.forward_positions import current

    return current().query_range(n_new)
