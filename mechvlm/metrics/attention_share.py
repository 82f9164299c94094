"""Attention share of query tokens over key roles (seed 000, Eq. 1-2; METHODS §1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.interventions._common import OnDevice
from mechvlm.metrics._common import (Batch, FwdHooks, Selection, frame, long_rows, map_batches, resolve, run_forward,
                                     select_layers, selection_label, user_hooks)
from mechvlm.metrics.attention_rows import QueryAttention


@dataclass
class AttentionShareResult:
    """Attention mass from the query tokens to each key role, and its shares.

    Attributes:
        raw: ``[example, layer, head, key]`` ``f_r = sum_{i in Q} sum_{j in K_r} A_ij``
            (Eq. 1; a sum over query rows, not a mean).
        share: ``[example, layer, head, key]`` ``f_r / sum_r' f_r'`` (Eq. 2); NaN where the
            example has no mass on any key role (e.g. no query tokens).
        head_share: ``[example, layer, key]`` the head-summed reading: the share of the mass
            summed over heads, ``sum_h f_r,h / sum_h sum_r' f_r',h`` (heads with more mass on
            the key roles weigh more; Narrow-gate's "sum over heads, normalise per layer").
        head_mean_share: ``[example, layer, key]`` the other reading: per-head shares
            averaged over heads.
        mean_share, mean_head_share, mean_head_mean_share: the three above averaged over
            examples (mean of per-example shares, NaN examples skipped).
        n_queries: ``[example]`` number of query tokens of each example.
        layers: the layer index of each ``layer`` entry; keys: a name per key role; query:
            the query selection's name.
    """

    raw: Float[Tensor, "example layer head key"]
    share: Float[Tensor, "example layer head key"]
    head_share: Float[Tensor, "example layer key"]
    head_mean_share: Float[Tensor, "example layer key"]
    n_queries: Int[Tensor, " example"]
    layers: list[int]
    keys: list[str]
    query: str

    @classmethod
    def from_raw(cls, raw: Tensor, n_queries: Tensor, layers, keys, query) -> "AttentionShareResult":
        share = raw / raw.sum(-1, keepdim=True)
        summed = raw.sum(2)
        return cls(raw=raw, share=share, head_share=summed / summed.sum(-1, keepdim=True),
                   head_mean_share=share.mean(2), n_queries=n_queries, layers=list(layers),
                   keys=list(keys), query=query)

    @property
    def mean_share(self) -> Float[Tensor, "layer head key"]:
        return self.share.nanmean(0)

    @property
    def mean_head_share(self) -> Float[Tensor, "layer key"]:
        return self.head_share.nanmean(0)

    @property
    def mean_head_mean_share(self) -> Float[Tensor, "layer key"]:
        return self.head_mean_share.nanmean(0)

    def to_dict(self) -> dict:
        return {"raw": self.raw, "share": self.share, "head_share": self.head_share,
                "head_mean_share": self.head_mean_share, "mean_share": self.mean_share,
                "mean_head_share": self.mean_head_share, "n_queries": self.n_queries,
                "layers": self.layers, "keys": self.keys, "query": self.query}

    def to_frame(self):
        """Long format, one row per (example, layer, head, key): raw and share."""
        e, _, h, _ = self.raw.shape
        axes = [("example", range(e)), ("layer", self.layers), ("head", range(h)), ("key", self.keys)]
        rows = long_rows(self.raw, axes, "raw")
        for row, s in zip(rows, self.share.reshape(-1).tolist()):
            row["share"] = s
        return frame(rows)


def key_role_reduce(kmask: Float[Tensor, "key batch pos"]):
    """``reduce(layer, mass)`` for `QueryAttention`: the mass on each key role,
    ``[batch, head, pos] -> [batch, head, key]`` (``kmask`` moved once per device)."""
    on = OnDevice(kmask)
    return lambda l, mass: torch.einsum("bhk,rbk->bhr", mass, on.get(mass.device))


def share_of_batch(model, batch: Batch, query: Selection, keys: Sequence[Selection], layers: list[int],
                   fwd_hooks: FwdHooks = None, query_chunk: int | None = None) -> dict:
    """One forward of ``batch`` with ``fwd_hooks``: ``{"raw": [batch, layer, head, key],
    "n_queries": [batch]}`` on the CPU (`attention_share`'s per-batch part)."""
    roles = model.roles(**batch)
    qmask = resolve(roles, query)
    kmask = torch.stack([resolve(roles, k) for k in keys]).to(model.device, torch.float32)
    hooks = user_hooks(fwd_hooks, batch, roles)
    qa = QueryAttention(model, layers, qmask, key_role_reduce(kmask), other_hooks=hooks, query_chunk=query_chunk)
    run_forward(model, batch, hooks + qa.hooks())
    return {"raw": torch.stack([qa.results[l].cpu() for l in layers], dim=1), "n_queries": qmask.sum(-1).cpu()}


def attention_share(
    model,
    batches: Batch | Iterable[Batch],
    query: Selection = "text",
    keys: Sequence[Selection] = ("image", "eoi"),
    layers: Iterable[int] | int | None = None,
    *,
    fwd_hooks: FwdHooks = None,
    progress: bool = True,
    query_chunk: int | None = None,
    journal=None,
) -> AttentionShareResult:
    """How the attention of ``query`` tokens splits over key roles, per layer and head.

    Streams: per layer only the query rows of the attention are computed (see
    `QueryAttention`); the forward keeps SDPA, no pattern is cached or materialised.

    Args:
        model: a `HookedVLM`.
        batches: one batch dict (the keyword arguments of ``model(**batch)``) or an
            iterable of them. Every row of every batch is one example.
        query: the query tokens ``Q`` (role name, ``[batch, pos]`` bool mask, list = union,
            or ``roles -> selection``). Default ``"text"``.
        keys: the key roles ``K_r``, one column each (default image vs EOI as in Eq. 2;
            add ``"image_start"``, ``"prefix"``, ``"bos"``, ``"text"``... for more columns).
        layers: layer indices (default all).
        fwd_hooks: interventions to run with (a hook list, or ``(batch, roles) -> hook
            list``); the metric sees their effect (e.g. a knockout's edited pattern).
        progress: show a tqdm bar over batches.
        query_chunk: query rows computed at once (default from the MLP activation size).
        journal: a `mechvlm.journal.JournalTask`: batches it holds are read back, the
            others computed and appended (a resumable run).

    Under an initialised process group (``torchrun``), every rank passes the same batches,
    computes its share of them and returns the whole result (`mechvlm.distributed`),
    equal to a one-process run's.

    METHODS §1's Narrow-gate variant is ``head_share`` with key selections {internal image
    tokens, last image token, EOI, image start} (pass callables ``roles -> mask``); averaging
    over text queries instead of summing does not change a share.
    """
    layer_list = select_layers(model, layers)
    keys = list(keys)
    if not keys:
        raise ValueError("attention_share needs at least one key role")

    def one_batch(batch: Batch) -> dict:
        return share_of_batch(model, batch, query, keys, layer_list, fwd_hooks, query_chunk)

    with torch.no_grad():
        parts = map_batches(one_batch, batches, progress=progress, desc="attention_share", journal=journal)
    return AttentionShareResult.from_raw(
        torch.cat([p["raw"] for p in parts]), torch.cat([p["n_queries"] for p in parts]), layer_list,
        [selection_label(k, i) for i, k in enumerate(keys)], selection_label(query))
