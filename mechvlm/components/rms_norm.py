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

    Hooks:
        hook_scale: ``[batch, pos, 1]`` fp32, ``sqrt(mean(x**2) + eps)`` (the divisor).
        hook_normalized: ``[batch, pos, d]``, ``x / scale`` before the weight (activation
            dtype for Qwen, fp32 for Gemma3, matching where each casts).
    """

    def __init__(self, d: int, eps: float, *, offset_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.offset_weight = offset_weight
        self.w = nn.Parameter(torch.empty(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        in_dtype = x.dtype
        x32 = x.float()
        var_eps = x32.pow(2).mean(-1, keepdim=True) + self.eps
        if self.hook_scale.is_observed():  # the divisor, as the hook left it (edits in place too)
            inv = self.hook_scale(var_eps.sqrt()).reciprocal()
        else:
            inv = torch.rsqrt(var_eps)  # HF's op: bit-identical to HF
        if self.offset_weight:
            normalized = self.hook_normalized(x32 * inv)
            return (normalized * (1.0 + self.w.float())).to(in_dtype)
        normalized = self.hook_normalized((x32 * inv).to(in_dtype))
        return self.w * normalized

    def extra_repr(self) -> str:
        return f"{tuple(self.w.shape)}, eps={self.eps}, offset_weight={self.offset_weight}"
