"""Reading the residual stream at selected positions, layer by layer, inside hooks.

Shared by `logit_lens` and `visual_text_similarity`: a hook per layer hands the hidden
states of the selected positions (``[n_selected, d_model]``, row-major over (row, pos)) to a
callback and keeps nothing else, so no ``[layer, batch, pos, d_model]`` cache is built.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.metrics._common import Hooks

EMBED = "embed"
LayerLabel = int | str


def resid_points(layers: list[int], include_embed: bool) -> list[tuple[LayerLabel, str]]:
    """``(label, hook name)``: ``"embed"`` = ``blocks.0.hook_resid_pre`` (the embeddings with
    the image features scattered in), layer ``l`` = ``blocks.{l}.hook_resid_post``."""
    out: list[tuple[LayerLabel, str]] = [(EMBED, "blocks.0.hook_resid_pre")] if include_embed else []
    return out + [(l, f"blocks.{l}.hook_resid_post") for l in layers]


def resid_hooks(points: list[tuple[LayerLabel, str]], positions: Bool[Tensor, "batch pos"],
                on_states: Callable[[LayerLabel, Tensor], None]) -> Hooks:
    """Hooks calling ``on_states(label, resid[positions])`` at each point."""
    def make(label):
        def read(resid: Tensor, hook) -> None:
            on_states(label, resid[positions.to(resid.device)])

        return read

    return [(name, make(label)) for label, name in points]


def final_norm(model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """``model.ln_final`` applied op for op (same dtype casts), without firing its hooks."""
    norm = model.ln_final
    x32 = x.float()
    normalized = x32 / (x32.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    w = norm.w.to(x.device)  # a no-op unless ln_final sits on another device
    if norm.offset_weight:  # Gemma3: (1 + w) in fp32
        return (normalized * (1.0 + w.float())).to(x.dtype)
    return w * normalized.to(x.dtype)  # Qwen: cast, then w *
