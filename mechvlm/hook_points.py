"""Hook points whose edits are checked.

`HookPoint` is TransformerLens' `HookPoint` (same hook signature ``fn(tensor, *, hook)``,
same contexts and handles). The only addition: a forward hook that returns a tensor is
checked against the activation it replaces. A wrong shape, dtype or device raises
`HookEditError` naming the hook point, instead of surfacing as an obscure failure several
layers later (or worse, broadcasting silently).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformer_lens.hook_points import HookPoint as _TLHookPoint


class HookEditError(ValueError):
    """A hook function returned something that cannot replace the activation."""


class UnknownHookError(ValueError):
    """A hook name (or name filter) that matches no hook point of the model."""


class OptInHookError(UnknownHookError, AssertionError):
    """A hook point that exists only once switched on (``set_use_attn_result``,
    ``set_use_split_qkv_input``, ``set_use_attn_in``, ``set_use_hook_mlp_in``). Also an
    ``AssertionError``, which is what TransformerLens raises there."""


ShapeRule = Callable[[torch.Size, torch.Size], bool]


class _CheckedHook:
    """Wraps a user hook; validates what it returns against the activation it saw."""

    def __init__(self, fn: Callable, point: "HookPoint"):
        self.fn = fn
        self.point = point

    def __call__(self, tensor: torch.Tensor, *, hook: Any) -> Any:
        out = self.fn(tensor, hook=hook)
        if out is not None:
            self.point.check_edit(out, tensor, self.fn)
        return out

    def __repr__(self) -> str:
        return repr(self.fn)


class HookPoint(_TLHookPoint):
    """A TransformerLens `HookPoint` that validates returned edits.

    Args:
        shape_rule: optional ``rule(activation_shape, returned_shape) -> bool`` for hook
            points that accept a broadcastable replacement (the attention mask accepts
            ``[b, 1, q, k]`` or ``[b, n_heads, q, k]``). By default the shape must match.
    """

    def __init__(self, shape_rule: ShapeRule | None = None):
        super().__init__()
        self.shape_rule = shape_rule

    def add_hook(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, alias_names=None):
        user_hook = hook.fn if isinstance(hook, _CheckedHook) else hook
        if dir == "fwd" and not isinstance(hook, _CheckedHook):
            hook = _CheckedHook(hook, self)
        handle = super().add_hook(
            hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend, alias_names=alias_names
        )
        handle.user_hook = user_hook  # list_hooks() shows the user's function, not the checker
        return handle

    def check_edit(self, out: Any, act: torch.Tensor, fn: Callable) -> None:
        where = f"hook {fn!r} at '{self.name}'"
        if not isinstance(out, torch.Tensor):
            raise HookEditError(f"{where} returned {type(out).__name__}; return a tensor or None")
        same = out.shape == act.shape
        if not same and not (self.shape_rule is not None and self.shape_rule(act.shape, out.shape)):
            raise HookEditError(
                f"{where} returned shape {tuple(out.shape)}, but the activation has shape "
                f"{tuple(act.shape)}"
            )
        if out.dtype != act.dtype:
            raise HookEditError(f"{where} returned dtype {out.dtype}, but the activation is {act.dtype}")
        if out.device != act.device:
            raise HookEditError(
                f"{where} returned a tensor on {out.device}, but the activation is on {act.device}"
            )

    def is_observed(self) -> bool:
        """True when any hook (forward or backward) is attached: its value must be computed."""
        return bool(self.fwd_hooks or self.bwd_hooks)


_OPT_IN = {"hook_result": "set_use_attn_result", "hook_q_input": "set_use_split_qkv_input",
           "hook_k_input": "set_use_split_qkv_input", "hook_v_input": "set_use_split_qkv_input",
           "hook_attn_in": "set_use_attn_in", "hook_mlp_in": "set_use_hook_mlp_in"}


def unknown_hook_error(name: str, known: Iterable[str]) -> UnknownHookError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    for suffix, switch in _OPT_IN.items():
        if name.endswith(suffix):
            return OptInHookError(f"{name!r} is opt-in: call model.{switch}(True) first")
    return UnknownHookError(
        f"unknown hook name {name!r}{hint}. model.hook_dict lists all {len(known)} hook points."
    )


def check_hook_list(hooks: Any, arg: str = "fwd_hooks") -> list[tuple[Any, Callable]]:
    """``hooks`` as a list of ``(hook_name_or_filter, fn)`` pairs; a `TypeError` that names
    the expected form for anything else (one pair not in a list, a dict, a bare function)."""
    form = f"{arg} must be a list of (hook_name, fn) pairs, e.g. [('blocks.0.hook_resid_post', fn)]"
    if hooks is None:
        return []
    if isinstance(hooks, dict):
        raise TypeError(f"{form}; got a dict (pass list(d.items()) if it maps names to functions)")
    if isinstance(hooks, tuple) and len(hooks) == 2 and isinstance(hooks[0], str) and callable(hooks[1]):
        raise TypeError(f"{form}; got one pair {hooks[0]!r}, fn: wrap it in a list, [(name, fn)]")
    if isinstance(hooks, (str, bytes)) or callable(hooks) or not isinstance(hooks, Iterable):
        raise TypeError(f"{form}; got {type(hooks).__name__}")
    out = list(hooks)
    for i, pair in enumerate(out):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{form}; item {i} is {type(pair).__name__} {pair!r:.60}, not a (hook_name, fn) pair")
        name, fn = pair
        if not (isinstance(name, str) or callable(name)):
            raise TypeError(f"{form}; item {i}: the hook name must be a str or a name filter, "
                            f"got {type(name).__name__}")
        if not callable(fn):
            raise TypeError(f"{form}; item {i} ({name!r}): the hook function must be callable, "
                            f"got {type(fn).__name__}")
    return out
