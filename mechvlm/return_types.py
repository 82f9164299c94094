"""``forward``'s ``return_type``: ``"logits" | "loss" | "both" | None`` (TransformerLens').

The loss is `mechvlm.losses.next_token_loss`: next-token cross-entropy over the scored
tokens, i.e. the ``target_mask`` (default: every token) minus position 0, padding, the
first real token after left padding and image placeholders. ``loss_per_token=True`` gives
TL's ``[batch, pos - 1]`` layout (entry ``t`` is the loss of token ``t + 1``; 0 where a
token is not scored).
"""

from __future__ import annotations

from torch import Tensor

from mechvlm.losses import next_token_loss

RETURN_TYPES = ("logits", "loss", "both", None)


def check_return_type(return_type) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")


def forward_output(logits: Tensor, input_ids: Tensor, return_type, *, loss_per_token: bool = False,
                   target_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                   image_token_id: int | None = None):
    """What ``forward`` returns for ``return_type`` given the logits."""
    if return_type == "logits":
        return logits
    loss = next_token_loss(logits, input_ids, target_mask, attention_mask=attention_mask,
                           image_token_id=image_token_id, per_token=loss_per_token)
    return loss if return_type == "loss" else (logits, loss)
