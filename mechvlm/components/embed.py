"""Token embedding and unembedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechvlm.hook_points import HookPoint


class Embed(nn.Module):
    """Token embedding ``W_E[input_ids] * scale``.

    ``scale`` is None for Qwen (no multiply) and ``sqrt(d_model)`` for Gemma3. As HF's
    ``Gemma3TextScaledWordEmbedding``, the scale is first an fp32 tensor and is then cast to
    the weight dtype (so in bf16 ``sqrt(2560) = 50.596`` becomes 50.5), and the product is
    taken in the weight dtype.
    """

    def __init__(self, d_vocab: int, d_model: int, scale: float | None = None):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))
        self.scale = scale

    def forward(self, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = F.embedding(input_ids, self.W_E)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=torch.float32, device=x.device).to(x.dtype)
        return x


class Unembed(nn.Module):
    """``logits = x @ W_U``; the weight is stored ``[d_vocab, d_model]`` like HF's lm_head
    (and is the same Parameter as ``Embed.W_E`` when the model ties them).

    Hooks (the names of TransformerLens' bridge): hook_in ``[batch, pos, d_model]`` the
    final-normed residual, hook_out ``[batch, pos, d_vocab]`` the logits."""

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(F.linear(self.hook_in(x), self.weight))

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """Zero: neither family has an unembedding bias."""
        return self.weight.new_zeros(self.weight.shape[0])

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.weight.T

