"""Which absolute token positions the running forward pass covers.

A forward over a KV cache runs only the new tokens: a hook at ``hook_z`` sees
``[batch, new_pos, ...]``, a hook at ``hook_pattern`` ``[batch, head, new_pos, cached +
new_pos]``. Interventions built from token roles index absolute positions (the roles of the
whole sequence), so they need to know where the new positions start. `HookedVLM.forward`
publishes it here for the duration of the forward (a context variable: nested and
concurrent forwards each see their own); interventions read it with `current`.

``continuation`` says that the forward continues a prompt: positions beyond the ones a hook
was built for are generated tokens (text after the prompt), so role-based hooks built from
the prompt's roles may extend their roles to them (`TokenRoles.extend`). It is True in a
forward over a non-empty KV cache and inside `mechvlm.generation` (also without a cache);
elsewhere a length mismatch between a hook's roles and the forward is an error.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardPositions:
    """``offset``: positions already in the KV cache before this forward's first token
    (0 without a cache); ``continuation``: see the module docstring."""

    offset: int = 0
    continuation: bool = False

    def query_range(self, n_new: int) -> tuple[int, int]:
        """``(start, stop)`` absolute positions of a forward with ``n_new`` new tokens."""
        return self.offset, self.offset + n_new


_CURRENT: ContextVar[ForwardPositions] = ContextVar("mechvlm_forward_positions", default=ForwardPositions())


def current() -> ForwardPositions:
    """The positions of the forward now running (offset 0 outside any forward)."""
    return _CURRENT.get()


@contextlib.contextmanager
def forward_positions(offset: int = 0, continuation: bool | None = None):
    """Publish a forward's positions; ``continuation=None`` keeps the enclosing value."""
    if continuation is None:
        continuation = _CURRENT.get().continuation
    token = _CURRENT.set(ForwardPositions(int(offset), bool(continuation)))
    try:
        yield
    finally:
        _CURRENT.reset(token)
