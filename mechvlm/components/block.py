"""One decoder layer with the TransformerLens residual-stream hooks."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from mechvlm.components.attention import Attention
from mechvlm.components.attention_mask import AttentionMask
from mechvlm.components.mlp import GatedMLP
from mechvlm.components.rms_norm import RMSNorm
from mechvlm.hook_points import HookPoint


class TransformerBlock(nn.Module):
    """Pre-norm block; with ``ln1_post``/``ln2_post`` it is Gemma3's sandwich block.

    ``resid_mid = resid_pre + [ln1_post](attn(ln1(resid_pre)))``
    ``resid_post = resid_mid + [ln2_post](mlp(ln2(resid_mid)))``

    Hooks, all ``[batch, pos, d_model]``: hook_resid_pre, hook_attn_out (what attention
    adds to the residual, after ``ln1_post`` when present), hook_resid_mid, hook_mlp_out,
    hook_resid_post.

    Opt-in hooks (None until switched on by ``HookedVLM.set_use_*``, as in TransformerLens):
        hook_attn_in: ``[batch, pos, head, d_model]`` a copy of ``resid_pre`` per query head,
            before ``ln1`` (``set_use_attn_in``). Under GQA every query head then computes
            its own K/V from its own copy (so an edit of one head's input stays in that head).
        hook_q_input ``[batch, pos, head, d_model]``, hook_k_input / hook_v_input
            ``[batch, pos, kv_head, d_model]``: separate copies for q, k and v, before ``ln1``
            (``set_use_split_qkv_input``); ``ln1`` (and its hooks) then runs on each.
        hook_mlp_in: ``[batch, pos, d_model]`` the MLP's input before ``ln2``
            (``set_use_hook_mlp_in``).
    """

    def __init__(self, attn: Attention, mlp: GatedMLP, ln1: RMSNorm, ln2: RMSNorm,
                 ln1_post: RMSNorm | None = None, ln2_post: RMSNorm | None = None):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.ln1_post, self.ln2_post = ln1_post, ln2_post
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_attn_in: HookPoint | None = None
        self.hook_q_input: HookPoint | None = None
        self.hook_k_input: HookPoint | None = None
        self.hook_v_input: HookPoint | None = None
        self.hook_mlp_in: HookPoint | None = None

    def _per_head(self, x: Tensor, n: int) -> Tensor:
        return x.unsqueeze(2).expand(-1, -1, n, -1).clone()

    def _attention(self, resid_pre: Tensor, rope, mask, kv_cache=None) -> Tensor:
        if self.hook_q_input is None and self.hook_attn_in is None:
            return self.attn(self.ln1(resid_pre), rope, mask, post_norm=self.ln1_post, kv_cache=kv_cache)
        n, kv = self.attn.n_heads, self.attn.n_kv_heads
        if self.hook_q_input is not None:
            inputs = (self.hook_q_input(self._per_head(resid_pre, n)),
                      self.hook_k_input(self._per_head(resid_pre, kv)),
                      self.hook_v_input(self._per_head(resid_pre, kv)))
        else:
            attn_in = self.hook_attn_in(self._per_head(resid_pre, n))
            inputs = (attn_in, attn_in, attn_in)
        normed = tuple(self.ln1(t) for t in inputs) if inputs[0] is not inputs[1] else (self.ln1(inputs[0]),) * 3
        return self.attn(None, rope, mask, qkv_inputs=normed, post_norm=self.ln1_post, kv_cache=kv_cache)

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], rope: tuple[Tensor, Tensor],
                mask: AttentionMask, kv_cache=None) -> Float[Tensor, "batch pos d_model"]:
        """``kv_cache``: this layer's KV-cache entry (see `Attention.forward`), or None."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self._attention(resid_pre, rope, mask, kv_cache)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.hook_mlp_in is not None else resid_mid
        mlp_out = self.mlp(self.ln2(mlp_in))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))
