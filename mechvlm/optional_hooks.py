"""TransformerLens' opt-in hook points (`HookedVLM.set_use_*`).

Each switch creates (or removes) hook points that cost memory or compute when present, as
in TransformerLens; adding a hook to one that is off raises `OptInHookError` (an
``AssertionError`` too, as TL raises there). Shapes: see `TransformerBlock`.
"""

from __future__ import annotations

from mechvlm.hook_points import HookPoint


class OptionalHooksMixin:
    """``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_attn_in``,
    ``set_use_hook_mlp_in``."""

    def set_use_attn_result(self, use: bool) -> None:
        """Create (or remove) ``blocks.{l}.attn.hook_result``, the per-head output
        ``[batch, pos, head, d_model]``. Off by default: it costs ``head`` times the
        memory of the attention output."""
        self.cfg.use_attn_result = use
        for block in self.blocks:
            block.attn.hook_result = HookPoint() if use else None
        self.setup()

    def set_use_split_qkv_input(self, use: bool) -> None:
        """``blocks.{l}.hook_q_input`` ``[batch, pos, head, d_model]`` and
        ``hook_k_input``/``hook_v_input`` ``[batch, pos, kv_head, d_model]``: separate copies
        of ``resid_pre`` for q, k and v, before ``ln1``. Excludes ``use_attn_in``."""
        if use and self.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input and use_attn_in cannot both be on (as in TransformerLens)")
        self.cfg.use_split_qkv_input = use
        for block in self.blocks:
            for name in ("hook_q_input", "hook_k_input", "hook_v_input"):
                setattr(block, name, HookPoint() if use else None)
        self.setup()

    def set_use_attn_in(self, use: bool) -> None:
        """``blocks.{l}.hook_attn_in`` ``[batch, pos, head, d_model]``: a copy of
        ``resid_pre`` per query head, before ``ln1``."""
        if use and self.cfg.use_split_qkv_input:
            raise ValueError("use_attn_in and use_split_qkv_input cannot both be on (as in TransformerLens)")
        self.cfg.use_attn_in = use
        for block in self.blocks:
            block.hook_attn_in = HookPoint() if use else None
        self.setup()

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """``blocks.{l}.hook_mlp_in`` ``[batch, pos, d_model]``: the MLP input before ``ln2``."""
        self.cfg.use_hook_mlp_in = use
        for block in self.blocks:
            block.hook_mlp_in = HookPoint() if use else None
        self.setup()
