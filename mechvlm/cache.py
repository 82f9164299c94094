"""`VLMActivationCache`: TransformerLens' `ActivationCache` with what a VLM cache needs.

It is TL's class (every helper works as documented there) with four changes:

* ``hook_image_embeds`` is ``[n_image_tokens, d_model]``, not batch-major: all images of
  the batch, concatenated. The cache keeps ``image_token_rows`` (``[n_image_tokens]``, the
  batch row of each image token, from the input ids), and ``remove_batch_dim`` /
  ``apply_slice_to_batch_dim`` use it: slicing the batch keeps the image tokens of the kept
  rows (an int slice keeps them as ``[n, d_model]``), instead of slicing along image
  tokens as TL's generic code would. ``image_embeds_by_row(i)`` returns one row's tokens.
* The attribution helpers (``apply_ln_to_stack`` and everything built on it:
  ``logit_attrs``, ``apply_ln=True`` of ``accumulated_resid`` / ``decompose_resid`` /
  ``stack_head_results`` / ``get_full_resid_decomposition``) raise unless the model's norms
  are folded (``process_weights_(fold_ln=True)``): TL divides by the cached scale but never
  applies the norm weight, which is only right once that weight is in the next linear map.
  ``recompute_ln=True`` at the final layer runs ``ln_final`` itself and is always allowed.
* Gemma3's sandwich post-norms: a head's result is ``z @ W_O`` passed through ``ln1_post``
  at the layer's cached scale (as the model's own ``hook_result``), and a neuron's result
  is ``post * W_out`` passed through ``ln2_post`` likewise, so heads sum to ``attn_out``
  and neurons to ``mlp_out``; ``get_full_resid_decomposition`` then sums to the residual.
  These need the ``ln1_post`` / ``ln2_post`` ``hook_scale`` in the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

IMAGE_EMBEDS = "hook_image_embeds"


class UnfoldedNormError(RuntimeError):
    """An attribution helper was called on a model whose norm weights are not folded."""


class VLMActivationCache(ActivationCache):
    """See the module docstring. ``image_token_rows``: ``[n_image_tokens]`` batch row of each
    image token (None when the input has no image)."""

    def __init__(self, cache_dict, model, has_batch_dim: bool = True, image_token_rows: Tensor | None = None,
                 batch_size: int | None = None):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.image_token_rows = image_token_rows
        self.batch_size = batch_size  # the run's, when known (a cache may hold no batch-major entry)

    # ------------------------------------------------------------ image embeddings --
    def _batch_size(self) -> int:
        if self.batch_size is not None and self.has_batch_dim:
            return self.batch_size
        sizes = [v.size(0) for k, v in self.cache_dict.items() if v.ndim > 0 and k != IMAGE_EMBEDS]
        if not sizes:
            return 1
        return max(set(sizes), key=sizes.count)

    def image_embeds_by_row(self, row: int) -> Tensor:
        """The ``hook_image_embeds`` vectors of batch row ``row``: ``[n, d_model]``."""
        if self.image_token_rows is None:
            raise KeyError("this cache holds no image embeddings")
        return self.cache_dict[IMAGE_EMBEDS][self.image_token_rows.to(self.cache_dict[IMAGE_EMBEDS].device) == row]

    def remove_batch_dim(self, batch_size: int | None = None) -> VLMActivationCache:
        embeds = self.cache_dict.pop(IMAGE_EMBEDS, None)
        try:
            super().remove_batch_dim(batch_size)
            self.batch_size = None
        finally:
            if embeds is not None:  # a batch of one: every image token is row 0's, nothing to drop
                self.cache_dict[IMAGE_EMBEDS] = embeds
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> VLMActivationCache:
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        rest = {k: v for k, v in self.cache_dict.items() if k != IMAGE_EMBEDS}
        sliced = ActivationCache(rest, self.model, self.has_batch_dim).apply_slice_to_batch_dim(batch_slice)
        rows = torch.arange(self._batch_size())
        kept = batch_slice.apply(rows, dim=0).reshape(-1)
        out = VLMActivationCache(sliced.cache_dict, self.model, sliced.has_batch_dim,
                                 batch_size=len(kept) if sliced.has_batch_dim else None)
        if IMAGE_EMBEDS in self.cache_dict and self.image_token_rows is not None:
            rows_of_tokens = self.image_token_rows.cpu()
            keep = torch.isin(rows_of_tokens, kept)
            # renumber the kept rows 0.. in their new order
            new_row = {int(r): i for i, r in enumerate(kept.tolist())}
            embeds = self.cache_dict[IMAGE_EMBEDS]
            out.cache_dict[IMAGE_EMBEDS] = embeds[keep.to(embeds.device)]
            out.image_token_rows = torch.tensor([new_row[int(r)] for r in rows_of_tokens[keep]], dtype=torch.long)
        return out

    # --------------------------------------------------------- attribution guards --
    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, recompute_ln=False):
        final = layer is None or layer == -1 or layer == self.model.cfg.n_layers
        if not getattr(self.model.cfg, "ln_folded", False) and not (recompute_ln and final):
            raise UnfoldedNormError(
                "apply_ln_to_stack (and logit_attrs, apply_ln=True) divides by the cached norm scale but does not "
                "apply the norm's weight: TransformerLens assumes it was folded into the next weights. Load with "
                "HookedVLM.from_pretrained(..., fold_ln=True) or call model.process_weights_(fold_ln=True) first "
                "(logits are unchanged)")
        return super().apply_ln_to_stack(residual_stack, layer=layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                         batch_slice=batch_slice, has_batch_dim=has_batch_dim,
                                         recompute_ln=recompute_ln)

    # ------------------------------------------------------ sandwich post-norms --
    def _post_norm_factor(self, layer: int, which: str) -> tuple[Tensor, Tensor] | None:
        """``(1 / scale [..., pos, 1], weight [d_model])`` of block ``layer``'s ``ln1_post`` /
        ``ln2_post``, or None without that norm."""
        norm = getattr(self.model.blocks[layer], which, None)
        if norm is None:
            return None
        key = f"blocks.{layer}.{which}.hook_scale"
        if key not in self.cache_dict:
            raise KeyError(f"per-component results of layer {layer} need '{key}' in the cache (the sandwich "
                           f"post-norm's scale): cache it too")
        return self.cache_dict[key].reciprocal(), norm.effective_weight

    def _ensure_head_results(self) -> bool:
        expected_ndim = 4 if self.has_batch_dim else 3
        all_cached = True
        for layer in range(self.model.cfg.n_layers):
            factor = self._post_norm_factor(layer, "ln1_post")
            key = f"blocks.{layer}.attn.hook_result"
            cached = self.cache_dict.get(key)
            if isinstance(cached, Tensor) and cached.ndim == expected_ndim and cached.shape[-2] == self.model.cfg.n_heads:
                continue
            all_cached = False
            z = self[("z", layer, "attn")]
            result = torch.einsum("...hd,hdm->...hm", z, self.model.blocks[layer].attn.W_O.to(z.dtype))
            if factor is not None:
                inv, weight = factor
                result = (result.float() * inv.unsqueeze(-2).float() * weight.float()).to(z.dtype)
            self.cache_dict[key] = result
        return all_cached

    def get_neuron_results(self, layer, neuron_slice=None, pos_slice=None, project_output_onto=None):
        factor = self._post_norm_factor(layer, "ln2_post")
        if factor is None:
            return super().get_neuron_results(layer, neuron_slice, pos_slice, project_output_onto)
        if not isinstance(neuron_slice, Slice):
            neuron_slice = Slice(neuron_slice)
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        inv, weight = factor
        acts = pos_slice.apply(self[("post", layer, "mlp")].float() * inv.float(), dim=-2)
        acts = neuron_slice.apply(acts, dim=-1)
        w_out = neuron_slice.apply(self.model.blocks[layer].mlp.W_out.float() * weight.float(), dim=0)
        dtype = self[("post", layer, "mlp")].dtype
        if project_output_onto is None:
            return (acts[..., None] * w_out).to(dtype)
        projected = w_out @ project_output_onto.float()
        out = acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected
        return out.to(dtype)

    def _stack_neuron_results_apply_ln_projected(self, *args, **kwargs):
        if any(getattr(b, "ln2_post", None) is not None for b in self.model.blocks):
            raise NotImplementedError("apply_ln=True with project_output_onto is not implemented for sandwich-norm "
                                      "models (Gemma3): project the stack yourself")
        return super()._stack_neuron_results_apply_ln_projected(*args, **kwargs)
