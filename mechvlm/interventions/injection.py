"""Mid-layer injection of image tokens (seed 003, EmbedLens; METHODS §10).

The image tokens enter the language model at layer ``k`` instead of layer 0: layers
``0 .. k-1`` run the text as if the image were absent (the text-only prefix), then the
projected image embeddings are written into the residual stream at ``blocks.k.hook_resid_pre``
and layers ``k ..`` run on the whole sequence.
"""

from __future__ import annotations

import torch

from mechvlm.interventions._common import Hooks, PositionSelection, token_query_range
from mechvlm.interventions.attention import knockout
from mechvlm.roles import RoleSpec, TokenRoles


def inject_at_layer(roles: TokenRoles, layer: int, tokens: RoleSpec = "image") -> Hooks:
    """Inject ``tokens`` (default: every image token) at ``layer`` instead of at the input.

    Hooks:
        * ``hook_embed`` ``[batch, pos, d_model]``: keeps the input embeddings of ``tokens``
          (the projected image features), unchanged.
        * ``blocks.{l}.attn.hook_attn_mask`` for ``l < layer``: no query attends ``tokens``
          (pre-softmax, SDPA), so every other token computes layers ``0 .. layer-1``
          exactly as on the sequence without them. Positions are not renumbered: the text
          after the image keeps the positions it has with the image in place, which are
          the positions it has from ``layer`` on.
        * ``blocks.{layer}.hook_resid_pre``: the residual of ``tokens`` is set back to their
          input embeddings; from there on the model runs unchanged.

    Over a KV cache (generation) the hooks act on each step's new positions: ``tokens``
    given by role name extend to the generated tokens (text, so nothing is injected there,
    and they do not attend ``tokens`` before ``layer``); a boolean mask needs the callable
    form ``(batch, roles) -> hooks`` (`mechvlm.generation`).

    ``layer=0`` is the model itself (no hooks). The residual of ``tokens`` before ``layer``
    is discarded (their own rows run but nothing reads them).
    """
    layer = int(layer)
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    if layer == 0:
        return []
    used_by = f"inject_at_layer(layer={layer})"
    sel = PositionSelection(tokens, roles, used_by)
    if not bool(sel.base.any()):
        raise ValueError(f"the token selection {tokens!r} is empty: nothing to inject")
    saved = {}

    def keep_embeddings(x, hook):
        start, stop = token_query_range(x.shape[1])
        sel.span(start, stop, x.device, batch=x.shape[0], where=hook.name)  # checks the batch / continuation
        saved["embed"] = (start, x.detach().clone())
        return x

    def inject(resid, hook):
        if "embed" not in saved:
            raise RuntimeError("inject_at_layer: hook_embed did not run before the injection layer")
        start, embed = saved["embed"]
        here = sel.span(start, start + resid.shape[1], resid.device, batch=resid.shape[0], where=hook.name)
        return torch.where(here[:, :, None], embed.to(resid), resid)

    return ([("hook_embed", keep_embeddings)]
            + knockout(roles, query="real", key=tokens, layers=range(layer), mode="pre_softmax_mask")
            + [(f"blocks.{layer}.hook_resid_pre", inject)])
