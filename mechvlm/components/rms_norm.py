"""RMSNorm with TransformerLens hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechvlm.hook_points import HookPoint


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as Hugging Face computes it.

    Qwen2.5-VL style (``offset_weight=False``): ``w * (x * rsqrt(ms + eps)).to(dtype)``: the cast
    back to the activation dtype happens BEFORE the weight multiply.
    Gemma3 style (``offset_weight=True``): ``((x * rsqrt(ms + eps)) * (1 + w)).to(dtype)`` in fp32.

    After ``HookedVLM.process_weights_(fold_ln=True)`` a norm whose weight was folded into
    the next linear map is weight-free (``folded=True``): it returns ``x / scale`` (cast to
    the activation dtype), TransformerLens' ``RMSNormPre``.

    Hooks:
        hook_scale: ``[batch, pos, 1]`` fp32, ``sqrt(mean(x**2) + eps)`` (the divisor).
        hook_normalized: ``[batch, pos, d]``, ``x / scale`` before the weight (activation
            dtype for Qwen, fp32 for Gemma3, matching where each casts).
    """

    def __init__(self, d: int, eps: float, *, offset_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.offset_weight = offset_weight
        self.folded = False
        self.w = nn.Parameter(torch.empty(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def effective_weight(self) -> Float[Tensor, " d"]:
        """The factor applied after normalising: ``w`` (Qwen) or ``1 + w`` (Gemma3), fp32
        for Gemma3; all ones once folded."""
        if self.folded:
            return torch.ones_like(self.w)
        return 1.0 + self.w.float() if self.offset_weight else self.w

    def _inv_scale(self, x32: Tensor) -> Tensor:
        var_eps = x32.pow(2).mean(-1, keepdim=True) + self.eps
        if self.hook_scale.is_observed():  # the divisor, as the hook left it (edits in place too)
            return self.hook_scale(var_eps.sqrt()).reciprocal()
        return torch.rsqrt(var_eps)  # HF's op: bit-identical to HF

    def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        in_dtype = x.dtype
        x32 = x.float()
        inv = self._inv_scale(x32)
        if self.folded:
            return self.hook_normalized((x32 * inv).to(in_dtype))
        if self.offset_weight:
            normalized = self.hook_normalized(x32 * inv)
            return (normalized * (1.0 + self.w.float())).to(in_dtype)
        normalized = self.hook_normalized((x32 * inv).to(in_dtype))
        return self.w * normalized

    def forward_parts(self, parts: Float[Tensor, "batch pos n d"]) -> Float[Tensor, "batch pos n d"]:
        """The norm of ``parts.sum(-2)`` distributed over the parts: every part is divided by
        the scale of the sum (``hook_scale`` fires on it, edits respected) and multiplied by
        the weight, so the results sum to ``forward(parts.sum(-2))`` (up to rounding). The
        norm is linear once its scale is fixed; this is how a sandwich post-norm (Gemma3) is
        applied to per-head results. ``hook_normalized`` does not fire here."""
        in_dtype = parts.dtype
        inv = self._inv_scale(parts.sum(-2).float()).unsqueeze(-2)
        if self.offset_weight and not self.folded:
            return (parts.float() * inv * (1.0 + self.w.float())).to(in_dtype)
        scaled = (parts.float() * inv).to(in_dtype)
        return scaled if self.folded else self.w * scaled

    def extra_repr(self) -> str:
        return (f"{tuple(self.w.shape)}, eps={self.eps}, offset_weight={self.offset_weight}"
                + (", folded" if self.folded else ""))
