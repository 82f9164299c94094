"""Logit lens on selected (image) positions (METHODS §6; seed 001, Neo et al.)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechvlm.interventions._common import OnDevice
from mechvlm.metrics._common import (Batch, FwdHooks, Selection, chunk_rows, frame, map_batches, resolve,
                                     run_forward, select_layers, selection_label, user_hooks)
from mechvlm.metrics.residual import LayerLabel, final_norm, resid_hooks, resid_points


@dataclass
class LogitLensResult:
    """Top-k next-token predictions read from intermediate residual streams.

    ``softmax(W_U . ln_final(h_l[j]))`` for every selected position ``j`` of every example
    and every layer ``l`` (``"embed"``: the input embeddings, then ``hook_resid_post`` of
    each layer; the last layer reproduces the model's own output distribution).

    Attributes:
        top_ids: ``[position, layer, k]`` the k most probable token ids.
        top_probs: ``[position, layer, k]`` their probabilities (fp32 softmax over the vocab).
        example: ``[position]`` the example (batch row, counted over all batches) of each entry.
        position: ``[position]`` the token position in its row.
        hits: ``[position, layer]`` whether the top-k hits ``labels`` (None without labels).
        layers: ``"embed"`` and/or layer indices, one per ``layer`` entry; positions: the
            selection's name; labels: the label ids, or None.
    """

    top_ids: Int[Tensor, "position layer k"]
    top_probs: Float[Tensor, "position layer k"]
    example: Int[Tensor, " position"]
    position: Int[Tensor, " position"]
    hits: Bool[Tensor, "position layer"] | None
    layers: list[LayerLabel]
    positions: str
    labels: list[int] | None
    n_examples: int

    @property
    def alignment(self) -> Float[Tensor, " layer"] | None:
        """"Semantic alignment": per layer, the fraction of selected positions (pooled over
        examples) whose top-k contains a label id. None without labels."""
        return None if self.hits is None else self.hits.float().mean(0)

    @property
    def alignment_per_example(self) -> Float[Tensor, "example layer"] | None:
        """The same per example (NaN for an example without selected positions)."""
        if self.hits is None:
            return None
        n_ex = self.n_examples
        out = torch.zeros(n_ex, len(self.layers)).index_add_(0, self.example, self.hits.float())
        count = torch.zeros(n_ex).index_add_(0, self.example, torch.ones(len(self.example)))
        return out / count[:, None]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("top_ids", "top_probs", "example", "position", "hits",
                                              "alignment", "layers", "positions", "labels")}

    def to_frame(self, tokenizer=None):
        """Long format, one row per (position, layer, rank); ``tokenizer`` adds token strings."""
        rows = []
        n, L, k = self.top_ids.shape
        ids, probs = self.top_ids.tolist(), self.top_probs.tolist()
        ex, pos = self.example.tolist(), self.position.tolist()
        for i in range(n):
            for li, layer in enumerate(self.layers):
                for r in range(k):
                    row = {"example": ex[i], "position": pos[i], "layer": layer, "rank": r,
                           "token_id": ids[i][li][r], "prob": probs[i][li][r]}
                    if tokenizer is not None:
                        row["token"] = tokenizer.decode([ids[i][li][r]])
                    rows.append(row)
        return frame(rows)


def logit_lens(
    model,
    batches: Batch | Iterable[Batch],
    positions: Selection = "image",
    k: int = 5,
    layers: Iterable[int] | int | None = None,
    *,
    labels: Iterable[int] | Tensor | None = None,
    include_embed: bool = True,
    fwd_hooks: FwdHooks = None,
    progress: bool = True,
    chunk: int | None = None,
    journal=None,
) -> LogitLensResult:
    """Logit lens: top-k tokens of ``softmax(W_U . ln_final(h_l[j]))`` per layer and position.

    Computed inside a hook per layer on the selected positions only, ``chunk`` positions at
    a time against the full vocabulary (default from the MLP activation size); the model's
    own unembedding of all positions is skipped. ``ln_final`` is applied as the model
    applies it (Qwen ``w * x``, Gemma3 ``(1 + w) * x``), in the model dtype, then ``W_U`` in
    the model dtype and a fp32 softmax, as the model's own logits.

    Args:
        positions: the positions to read (default the image tokens).
        k: how many top tokens to keep.
        layers: layer indices (default all); ``include_embed`` adds the embeddings first.
        labels: token ids of a reference set (e.g. object names); gives ``hits`` and
            ``alignment``.
        fwd_hooks, progress, journal: as in `attention_share` (process groups too).
    """
    layer_list = select_layers(model, layers)
    points = resid_points(layer_list, include_embed)
    label_t = None
    if labels is not None:
        label_t = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels,
                                  dtype=torch.long).flatten().to(model.device)
    W = model.unembed.weight  # [d_vocab, d_model]
    if W.is_meta:
        raise ValueError("logit_lens reads the unembedding inside the blocks' hooks: it cannot run with unembed "
                         "offloaded (device_map 'cpu' / 'disk'); keep unembed on a device")
    labels_on = OnDevice(label_t) if label_t is not None else None

    def one_batch(batch: Batch) -> dict:
        roles = model.roles(**batch)
        pmask = resolve(roles, positions).to(model.device)
        b, n = pmask.shape
        step = chunk or chunk_rows(model, b * n, model.cfg.d_vocab)
        per_layer: dict[LayerLabel, tuple[Tensor, Tensor]] = {}

        def on_states(label, h: Tensor) -> None:
            h = h.to(W.device)  # the selected positions only, to the unembedding's device
            ids, probs = [], []
            for s in range(0, h.shape[0], step):
                logits = F.linear(final_norm(model, h[s:s + step]), W)
                p, i = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
                ids.append(i)
                probs.append(p)
            empty = h.new_zeros(0, k)
            per_layer[label] = (torch.cat(ids) if ids else empty.long(),
                                torch.cat(probs) if probs else empty.float())

        hooks = user_hooks(fwd_hooks, batch, roles)
        run_forward(model, batch, hooks + resid_hooks(points, pmask, on_states))
        ids = torch.stack([per_layer[label][0] for label, _ in points], dim=1)  # [m, L, k]
        row, pos = pmask.nonzero(as_tuple=True)
        return {"ids": ids.cpu(), "probs": torch.stack([per_layer[label][1] for label, _ in points], dim=1).cpu(),
                "hits": torch.isin(ids, labels_on.get(ids.device)).any(-1).cpu() if labels_on else None,
                "row": row.cpu(), "pos": pos.cpu(), "b": b}

    with torch.no_grad():
        parts = map_batches(one_batch, batches, progress=progress, desc="logit_lens", journal=journal)
    out_ids, out_probs, out_hits, out_ex, out_pos = [], [], [], [], []
    n_seen = 0
    for part in parts:
        out_ids.append(part["ids"])
        out_probs.append(part["probs"])
        if label_t is not None:
            out_hits.append(part["hits"])
        out_ex.append(part["row"] + n_seen)
        out_pos.append(part["pos"])
        n_seen += part["b"]
    return LogitLensResult(
        top_ids=torch.cat(out_ids), top_probs=torch.cat(out_probs), example=torch.cat(out_ex),
        position=torch.cat(out_pos), hits=torch.cat(out_hits) if label_t is not None else None,
        layers=[label for label, _ in points], positions=selection_label(positions),
        labels=label_t.tolist() if label_t is not None else None, n_examples=n_seen)
