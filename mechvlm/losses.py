"""Language-model losses restricted to chosen target tokens (answers, captions).

The convention is Hugging Face's and TransformerLens': the logits at position ``t - 1``
predict the token at position ``t``. A ``target_mask`` marks the tokens that are scored
(``True`` at ``t`` scores the prediction of ``input_ids[:, t]`` made at ``t - 1``); image
tokens, padding, a token predicted from a padding position (the first real token of a
left-padded row) and position 0 are never scored, whatever the mask says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


def scored_positions(input_ids: Int[Tensor, "batch pos"], target_mask: Bool[Tensor, "batch pos"] | None,
                     *, attention_mask: Tensor | None = None, image_token_id: int | None = None,
                     ) -> Bool[Tensor, "batch pos"]:
    """The positions whose token is scored: ``target_mask`` (default: every token) minus
    position 0, padding, the first real token after left padding, and image placeholders."""
    if target_mask is None:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if target_mask.shape != input_ids.shape:
            raise ValueError(f"target_mask has shape {tuple(target_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}")
        if target_mask.dtype != torch.bool:
            raise TypeError(f"target_mask must be a bool tensor, got {target_mask.dtype}")
        keep = target_mask.to(input_ids.device).clone()
    keep[:, 0] = False
    if attention_mask is not None:  # the token and the position predicting it must be real
        real = attention_mask.to(input_ids.device).bool()
        keep &= real
        keep[:, 1:] &= real[:, :-1]
    if image_token_id is not None:
        keep &= input_ids != image_token_id
    return keep


def next_token_loss(logits: Float[Tensor, "batch pos d_vocab"], input_ids: Int[Tensor, "batch pos"],
                    target_mask: Bool[Tensor, "batch pos"] | None = None, *,
                    attention_mask: Tensor | None = None, image_token_id: int | None = None,
                    per_token: bool = False) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy (fp32) of the scored tokens (see `scored_positions`).

    Returns the mean over scored tokens, or with ``per_token=True`` a ``[batch, pos - 1]``
    tensor (TransformerLens' ``loss_per_token`` layout: entry ``t`` is the loss of token
    ``t + 1``) holding 0 where a token is not scored. Raises if no token is scored.
    """
    keep = scored_positions(input_ids, target_mask, attention_mask=attention_mask,
                            image_token_id=image_token_id)[:, 1:]
    if not bool(keep.any()):
        raise ValueError("no token is scored: the target mask selects no real, non-image token after position 0")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
    nll = nll * keep.to(nll.device)
    if per_token:
        return nll
    return nll.sum() / keep.sum()
