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

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], rope: tuple[Tensor, Tensor],
                mask: AttentionMask, kv_cache=None) -> Float[Tensor, "batch pos d_model"]:
        """``kv_cache``: this layer's KV-cache entry (see `Attention.forward`), or None."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(self.ln1(resid_pre), rope, mask, kv_cache)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid_mid))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))
