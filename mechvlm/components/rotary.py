"""Rotary position embeddings: 1-D RoPE and Qwen2.5-VL's multimodal RoPE (mRoPE)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "batch pos d_head"],
    sin: Float[Tensor, "batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """``x * cos + rotate_half(x) * sin`` (HF's formula), for the TransformerLens layout."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)


class RotaryEmbedding:
    """Computes ``cos``/``sin`` tables for one forward pass (no parameters, no state).

    Args:
        d_head: rotary dimension (the whole head).
        theta: RoPE base.
        scaling_factor: linear scaling (``inv_freq / factor``); 1.0 for none.
        mrope_section: for mRoPE, how the ``d_head/2`` frequency slots split over the
            (t, h, w) position rows; chunk ``i`` takes row ``i % 3`` (HF's recomposition).
        inv_freq: ``[d_head/2]`` frequencies computed elsewhere (e.g. by HF's
            ``ROPE_INIT_FUNCTIONS`` for Llama-3's frequency-dependent scaling); replaces
            the ones from ``theta`` and ``scaling_factor``.
    """

    def __init__(self, d_head: int, theta: float, scaling_factor: float = 1.0,
                 mrope_section: tuple[int, ...] | None = None, inv_freq: Tensor | None = None):
        self.d_head = d_head
        if inv_freq is not None:
            if tuple(inv_freq.shape) != (d_head // 2,):
                raise ValueError(f"inv_freq must have shape ({d_head // 2},), got {tuple(inv_freq.shape)}")
            self.inv_freq = inv_freq.detach().to("cpu", torch.float32)
        else:
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64, device="cpu").float()
                                             / d_head))
            self.inv_freq = self.inv_freq / scaling_factor
        self.mrope_section = list(mrope_section) if mrope_section is not None else None

    def __call__(
        self, position_ids: Int[Tensor, "*rows batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
        inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # [*rows, b, p, d/2]
        if self.mrope_section is not None:
            if position_ids.ndim != 3 or position_ids.shape[0] != 3:
                raise ValueError(f"mRoPE needs position ids of shape [3, batch, pos], got {tuple(position_ids.shape)}")
            chunks = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
