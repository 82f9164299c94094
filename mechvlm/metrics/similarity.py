"""Cosine similarity of image-token hidden states to text embeddings (METHODS §7; seed 001)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechvlm.metrics._common import (Batch, FwdHooks, Selection, chunk_rows, frame, map_batches, long_rows,
                                     resolve, run_forward, select_layers, selection_label, user_hooks)
from mechvlm.metrics.residual import LayerLabel, resid_hooks, resid_points

REFERENCES = ("prompt", "vocab")


@dataclass
class VisualTextSimilarityResult:
    """Per layer, how close image-token hidden states are to text-token input embeddings.

    For an example, image token ``j`` and layer ``l``: ``c_jt = cos(h_l[j], e_t)`` over the
    reference embeddings ``e_t`` (rows of ``W_E``); ``max`` = mean over image tokens of
    ``max_t c_jt``, ``mean`` = mean over image tokens of ``mean_t c_jt``.

    Attributes:
        max, mean: ``[example, layer]`` (NaN for an example without image or reference tokens).
        layers: ``"embed"`` (the LM input, image features scattered in) and/or layer indices;
        reference: ``"prompt"`` (the distinct token ids of the example's text tokens) or
            ``"vocab"`` (every row of ``W_E``); image, text: the selections' names.
    """

    max: Float[Tensor, "example layer"]
    mean: Float[Tensor, "example layer"]
    layers: list[LayerLabel]
    reference: str
    image: str
    text: str

    @property
    def mean_max(self) -> Float[Tensor, " layer"]:
        return self.max.nanmean(0)

    @property
    def mean_mean(self) -> Float[Tensor, " layer"]:
        return self.mean.nanmean(0)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("max", "mean", "mean_max", "mean_mean", "layers", "reference",
                                              "image", "text")}

    def to_frame(self):
        """Long format, one row per (example, layer): max and mean cosine."""
        axes = [("example", range(self.max.shape[0])), ("layer", self.layers)]
        rows = long_rows(self.max, axes, "max")
        for row, m in zip(rows, self.mean.reshape(-1).tolist()):
            row["mean"] = m
        return frame(rows)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def visual_text_similarity(
    model,
    batches: Batch | Iterable[Batch],
    image: Selection = "image",
    text: Selection = "text",
    layers: Iterable[int] | int | None = None,
    reference: str = "prompt",
    *,
    include_embed: bool = True,
    fwd_hooks: FwdHooks = None,
    progress: bool = True,
    vocab_chunk: int | None = None,
    journal=None,
) -> VisualTextSimilarityResult:
    """Cosine similarity between image-token hidden states and text-token input embeddings.

    ``h_l[j]`` is read at ``hook_resid_post`` of each layer (and the embeddings first when
    ``include_embed``) for the ``image`` positions only, inside hooks; cosines are in fp32.

    Args:
        image: the positions whose hidden states are compared (default image tokens).
        text: with ``reference="prompt"``, the tokens whose embedding rows form the
            reference (default the text role; each distinct id once).
        reference: ``"prompt"`` or ``"vocab"`` (all of ``W_E``, ``vocab_chunk`` rows at a
            time; default from the MLP activation size).
        layers, fwd_hooks, progress, journal: as in `attention_share` (process groups too).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    layer_list = select_layers(model, layers)
    points = resid_points(layer_list, include_embed)
    W_E = model.W_E
    if W_E.is_meta:
        raise ValueError("visual_text_similarity reads the embedding inside the blocks' hooks: it cannot run with "
                         "embed offloaded (device_map 'cpu' / 'disk'); keep embed on a device")
    inv_norm = None
    with torch.no_grad():
        if reference == "vocab":
            step = vocab_chunk or 4096
            inv_norm = torch.cat([1.0 / W_E[s:s + step].float().norm(dim=-1).clamp_min(1e-12)
                                  for s in range(0, W_E.shape[0], step)])

    def one_batch(batch: Batch) -> dict:
        roles = model.roles(**batch)
        imask = resolve(roles, image).to(model.device)
        b, n = imask.shape
        row_of = imask.nonzero(as_tuple=True)[0]  # the batch row of each selected state
        counts = imask.sum(-1)
        refs = None
        if reference == "prompt":
            tmask = resolve(roles, text).to(model.device)
            ids = batch["input_ids"].to(model.device)
            refs = [_unit(W_E[ids[r][tmask[r]].unique()]) for r in range(b)]
        step = vocab_chunk or chunk_rows(model, b * n, max(1, int(counts.sum())))
        per_layer: dict[LayerLabel, tuple[Tensor, Tensor]] = {}

        def on_states(label, h: Tensor) -> None:
            hu = _unit(h.to(W_E.device))  # [m, d], the selected positions only, on the embedding's device
            if reference == "prompt":
                mx = hu.new_full((hu.shape[0],), float("nan"))
                mn = mx.clone()
                for r in range(b):
                    sel = row_of == r
                    if sel.any() and len(refs[r]):
                        cos = hu[sel] @ refs[r].T
                        mx[sel], mn[sel] = cos.max(-1).values, cos.mean(-1)
            else:
                mx = hu.new_full((hu.shape[0],), -float("inf"))
                total = hu.new_zeros(hu.shape[0])
                for s in range(0, W_E.shape[0], step):
                    cos = (hu @ W_E[s:s + step].float().T) * inv_norm[s:s + step]
                    mx = torch.maximum(mx, cos.max(-1).values)
                    total += cos.sum(-1)
                mn = total / W_E.shape[0]
            # average over each example's image tokens
            per_layer[label] = tuple(
                torch.zeros(b, device=hu.device).index_add_(0, row_of, v) / counts for v in (mx, mn))

        hooks = user_hooks(fwd_hooks, batch, roles)
        run_forward(model, batch, hooks + resid_hooks(points, imask, on_states))
        return {"max": torch.stack([per_layer[label][0] for label, _ in points], dim=1).cpu(),
                "mean": torch.stack([per_layer[label][1] for label, _ in points], dim=1).cpu()}

    with torch.no_grad():
        parts = map_batches(one_batch, batches, progress=progress, desc="visual_text_similarity", journal=journal)
    maxes, means = [p["max"] for p in parts], [p["mean"] for p in parts]
    return VisualTextSimilarityResult(
        max=torch.cat(maxes), mean=torch.cat(means), layers=[label for label, _ in points],
        reference=reference, image=selection_label(image), text=selection_label(text))
