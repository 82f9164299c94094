"""Helpers shared by the interventions: layer selection, per-device mask caches, and token
selections resolved for the positions of each forward (KV-cache steps included)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechvlm.roles import RolesBatchMismatch, TokenRoles

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
    if heads[0] < 0:
        raise ValueError(f"heads: {heads[0]} is not a head index (heads count from 0; negative indices "
                         "are refused rather than wrapped)")
    return heads


# ----------------------------------------------------------- positions of a forward --
def spec_label(spec) -> str:
    """A role spec for messages: ``'text'``, ``['text', 'eoi']``, ``<mask [1, 18]>``."""
    if isinstance(spec, str):
        return repr(spec)
    if isinstance(spec, Tensor):
        return f"<mask {list(spec.shape)}>"
    return "[" + ", ".join(spec_label(s) for s in spec) + "]"


def _names_only(spec) -> bool:
    if isinstance(spec, str):
        return True
    if isinstance(spec, Tensor):
        return False
    return all(_names_only(s) for s in spec)


class PositionSelection:
    """A ``[batch, pos]`` token selection over absolute positions, resolved for the positions
    each forward covers (the new tokens of a KV-cache step, or the whole sequence).

    ``spec`` is a role name, a bool ``[batch, pos]`` mask, or a list of them (union), read
    through ``roles`` (`TokenRoles.mask`); without ``roles`` it must be a bool mask.
    ``used_by`` names the intervention in error messages.

    Checks, at hook time: a whole-sequence forward must be the batch the roles came from
    (`TokenRoles.check_runs_on`, issue 12); a KV-cache step must continue it
    (`TokenRoles.check_continues`). A forward that reaches past the selection's positions
    is a continuation of the prompt (`mechvlm.forward_positions`): role names then extend to
    the generated tokens (`TokenRoles.extend`: text after the prompt); a selection holding a
    boolean mask cannot be extended and raises, naming the fix (the callable form).
    """

    def __init__(self, spec, roles: TokenRoles | None = None, used_by: str = "a token selection"):
        self.used_by = used_by
        if roles is None:
            if not isinstance(spec, Tensor) or spec.dtype != torch.bool or spec.ndim != 2:
                raise ValueError(f"{used_by} must be a [batch, pos] boolean mask")
            self.base, self.roles, self.spec = spec, None, None
        else:
            self.base, self.roles, self.spec = roles.mask(spec), roles, spec
        self.batch, self.length = self.base.shape
        self.extensible = roles is not None and _names_only(spec)
        self._last: tuple | None = None

    def _mismatch(self, batch: int, total: int, where: str) -> Exception:
        if self.roles is not None:
            try:  # the message (and error type) of issue 12's check
                self.roles.check_runs_on(batch, total, where=where, used_by=self.used_by)
            except RolesBatchMismatch as e:
                return e
        return RolesBatchMismatch(f"{self.used_by} {tuple(self.base.shape)} does not match [batch, pos] = "
                                  f"{(batch, total)} at '{where}' (it was built for another batch)")

    def _check(self, batch: int, start: int, total: int, where: str, continuation: bool) -> None:
        if batch != self.batch or (total != self.length and not continuation) or \
                (total < self.length and start == 0):
            raise self._mismatch(batch, total, where)
        if self.roles is None:
            return
        if start == 0 and total == self.length:
            self.roles.check_runs_on(batch, total, where=where, used_by=self.used_by)
        else:
            self.roles.check_continues(batch, start, total, where=where, used_by=self.used_by)

    def full(self, total: int, device: torch.device, *, batch: int, start: int = 0,
             where: str = "") -> Bool[Tensor, "batch total"]:
        """The selection over absolute positions ``0 .. total-1`` for a forward whose new
        positions start at ``start``."""
        from mechvlm.forward_positions import current

        continuation = current().continuation or start > 0
        self._check(batch, start, total, where, continuation)
        key = (total, device, continuation)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if total <= self.length:
            out = self.base[:, :total]
        elif not self.extensible:
            raise RolesBatchMismatch(
                f"{self.used_by} (from a boolean mask) was built for {self.length} positions but this forward "
                f"reaches position {total - 1}: in a generation step, pass fwd_hooks as a callable "
                "(batch, roles) -> hooks so the hooks are rebuilt from each step's roles (or select "
                "tokens by role name)")
        else:
            out = self.roles.extend(total - self.length).mask(self.spec)
        out = out.to(device)
        self._last = (key, out)
        return out

    def span(self, start: int, stop: int, device: torch.device, *, batch: int, where: str = "") -> Bool[Tensor, "batch n"]:
        """The selection at absolute positions ``start .. stop-1`` (this forward's new positions)."""
        return self.full(stop, device, batch=batch, start=start, where=where)[:, start:stop]


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
