"""How `HookedVLM` turns token ids and pixels into the embeddings its first block reads:
the vision tower's features (or given ``image_embeds`` / ``video_embeds``) pass
``hook_image_embeds`` / ``hook_video_embeds`` and are scattered into their placeholder
tokens (narrowed to the kept cells when ``image_cells`` removed tokens).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from mechvlm.image_layout import kept_feature_index
from mechvlm.models.base import VISUAL_INPUTS, PreparedInputs, VisualInput, check_image_embeds


class VisualFeaturesMixin:
    """`HookedVLM`'s embedding of a batch: token embeddings with the visual features in."""

    def _embed(self, inputs: PreparedInputs, given: dict[str, Tensor | None], offset: int = 0) -> Tensor:
        """Token embeddings with the image (and video) features scattered in (``hook_embed``'s
        input); ``given``: precomputed features per modality (None: run the tower);
        ``offset``: positions already in the KV cache."""
        ids = inputs.input_ids
        n_ctx = self.cfg.n_ctx
        if n_ctx is not None and offset + ids.shape[1] > n_ctx and not self._warned_n_ctx:
            self._warned_n_ctx = True
            warnings.warn(f"the input has {offset + ids.shape[1]} positions, more than the model's "
                          f"max_position_embeddings = {n_ctx}: results past that length are "
                          "extrapolated (warned once per model)", stacklevel=3)
        if self.cfg.image_token_id is not None and self.cfg.image_token_id >= self.cfg.d_vocab:
            ids = ids.masked_fill(ids == self.cfg.image_token_id, 0)  # as HF: an out-of-vocab placeholder
        x = self.embed(ids)
        given = dict(given)
        for vis in inputs.visual:
            x = self._scatter(x, inputs, vis, given.pop(vis.modality, None))
        for modality, embeds in given.items():
            if embeds is not None:  # raises: nothing to fill
                check_image_embeds(embeds, 0, self.cfg.d_model, x.device, what=modality)
        return self.hook_embed(x)

    def _scatter(self, x: Tensor, inputs: PreparedInputs, vis: VisualInput, given: Tensor | None) -> Tensor:
        """``x`` with one modality's features (computed unless given) in its placeholders;
        when ``image_cells`` removed tokens, the hooked whole-image features are then
        narrowed to the kept cells."""
        hook = getattr(self, f"hook_{vis.modality}_embeds")
        if given is None:
            feats = self._encode(vis.encoder_kwargs).to(x.dtype)
        else:  # the whole images' features, also when image_cells keep only some cells
            check_image_embeds(given, vis.n_features, self.cfg.d_model, x.device, what=vis.modality)
            feats = given.to(x.dtype)
            if feats is given and hook.is_observed():
                feats = feats.clone()  # a hook's in-place edit must not reach the caller's tensor
        feats = hook(feats)
        spans = [s for s in inputs.spans if s.modality == vis.modality]
        if any(s.cells is not None for s in spans):
            feats = feats[kept_feature_index(spans, feats.shape[0]).to(feats.device)]
        input_ids = inputs.input_ids
        mask = (input_ids == vis.token_id).unsqueeze(-1)
        if feats.numel() != int(mask.sum()) * x.shape[-1]:
            raise ValueError(f"{vis.modality} features hold {feats.numel() // x.shape[-1]} token vectors but the "
                             f"input has {int(mask.sum())} {vis.modality} tokens")
        return x.masked_scatter(mask, feats)

    def _encode(self, encoder_kwargs: dict) -> Tensor:
        if self.vision is None:
            raise RuntimeError("this HookedVLM has no vision encoder")
        return self.vision(**{k: v.to(self.device) if isinstance(v, Tensor) else v
                              for k, v in encoder_kwargs.items()})

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **visual) -> Tensor:
        """The vision encoder's output (HF's tower and projector): one ``d_model`` vector per
        image token, in the order the image tokens appear. ``visual``: ``image_sizes`` /
        ``batch_num_images`` for LLaVA-NeXT / OneVision."""
        kwargs = {"pixel_values": pixel_values, **{k: v for k, v in visual.items() if v is not None}}
        if image_grid_thw is not None:
            kwargs["image_grid_thw"] = image_grid_thw
        return self._encode(kwargs)

    def visual_embeds(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                      image_grid_thw: Tensor | None = None, attention_mask: Tensor | None = None,
                      **batch) -> dict[str, Tensor]:
        """The vision features of a batch, ``{"image_embeds": ..., "video_embeds": ...}`` for the
        modalities present: pass them back to ``forward`` (with the same batch) to skip the
        vision tower, e.g. at every generation step. With ``image_cells`` the features are
        still those of the whole images (what ``forward`` takes)."""
        visual = {k: batch[k] for k in VISUAL_INPUTS if batch.get(k) is not None}
        inputs = self.prepare_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                     batch.get("token_type_ids"), batch.get("image_cells"), **visual)
        return {f"{vis.modality}_embeds": self._encode(vis.encoder_kwargs) for vis in inputs.visual}
