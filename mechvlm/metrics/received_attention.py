"""Attention received by each image token and its concentration (seed 000 Fig. 2-3; METHODS §2)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.interventions._common import OnDevice
from mechvlm.metrics._common import (Batch, FwdHooks, Selection, frame, long_rows, map_batches, resolve, run_forward,
                                     select_heads, select_layers, selection_label, user_hooks)
from mechvlm.metrics.attention_rows import QueryAttention


def cumulative_mass(r: Float[Tensor, "... token"]) -> Float[Tensor, "... token_plus_1"]:
    """``C_k``: the share of the total carried by the ``k`` largest entries, ``k = 0..n``
    (``C_0 = 0``, ``C_n = 1``); NaN when the total is 0."""
    s = r.sort(dim=-1, descending=True).values.cumsum(-1)
    c = s / s[..., -1:]
    return torch.cat([torch.zeros_like(c[..., :1]), c], dim=-1)


def fraction_for_mass(cum: Float[Tensor, "... token_plus_1"], thresholds: Sequence[float],
                      atol: float = 1e-6) -> Float[Tensor, "... threshold"]:
    """Smallest fraction ``k / n`` of tokens whose top-``k`` carries at least each threshold."""
    n = cum.shape[-1] - 1
    t = torch.tensor(thresholds, dtype=cum.dtype)
    k = (cum[..., None, :] < t[:, None] - atol).sum(-1)  # C_k < p for k < k*, C_0 = 0 counts
    frac = k.to(cum.dtype) / n
    return frac.masked_fill(cum[..., -1:].isnan(), float("nan"))


def curve_on_grid(cum: Float[Tensor, "... token_plus_1"], x: Float[Tensor, " grid"]) -> Float[Tensor, "... grid"]:
    """The cumulative curve ``(k/n, C_k)`` linearly interpolated at fractions ``x``."""
    n = cum.shape[-1] - 1
    t = x * n
    k0 = t.floor().long().clamp(max=n - 1)
    w = t - k0
    c0 = cum[..., k0]
    c1 = cum[..., k0 + 1]
    return c0 + w * (c1 - c0)


@dataclass
class ReceivedAttentionResult:
    """Attention that the ``key`` tokens (image tokens) receive from the ``query`` tokens.

    Attributes:
        received: per example ``[layer, head, n_key]``: ``r_j = sum_{i in Q} A_ij`` for the
            example's key tokens in position order (empty list when ``keep_received=False``).
        positions: per example ``[n_key]`` the key tokens' positions in the row.
        frac_tokens: ``[example, layer, head, threshold]`` the smallest fraction of key
            tokens that carries ``threshold`` of the head's received mass.
        frac_tokens_head_mean: ``[example, layer, threshold]`` the same for the head-mean
            ``r`` (mean over the selected heads).
        curve: ``[example, layer, grid]`` the cumulative curve of the head-mean ``r`` (sorted
            descending, normalised to 1) at ``curve_x`` (fraction of key tokens).
        curve_per_head_mean: ``[layer, head, grid]`` the per-head curves averaged over examples.
        curve_x: ``[grid]`` fractions of key tokens, 0..1.
        layers, heads, thresholds, query, key: what was measured.
    Rows with no key token or no received mass are NaN.
    """

    received: list[Float[Tensor, "layer head key"]]
    positions: list[Int[Tensor, " key"]]
    frac_tokens: Float[Tensor, "example layer head threshold"]
    frac_tokens_head_mean: Float[Tensor, "example layer threshold"]
    curve: Float[Tensor, "example layer grid"]
    curve_per_head_mean: Float[Tensor, "layer head grid"]
    curve_x: Float[Tensor, " grid"]
    layers: list[int]
    heads: list[int]
    thresholds: tuple[float, ...]
    query: str
    key: str

    @property
    def mean_frac_tokens(self) -> Float[Tensor, "layer threshold"]:
        """Per layer: fraction of key tokens carrying each threshold of the head-mean mass,
        averaged over examples (the seed's summary number)."""
        return self.frac_tokens_head_mean.nanmean(0)

    @property
    def mean_frac_tokens_per_head(self) -> Float[Tensor, "layer head threshold"]:
        return self.frac_tokens.nanmean(0)

    @property
    def mean_curve(self) -> Float[Tensor, "layer grid"]:
        return self.curve.nanmean(0)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "received", "positions", "frac_tokens", "frac_tokens_head_mean", "curve", "curve_per_head_mean",
            "curve_x", "mean_frac_tokens", "mean_curve", "layers", "heads", "thresholds", "query", "key")}

    def to_frame(self):
        """Long format, one row per (layer, threshold): the example-mean fraction of key
        tokens carrying that share of the head-mean received attention."""
        axes = [("layer", self.layers), ("threshold", self.thresholds)]
        return frame(long_rows(self.mean_frac_tokens, axes, "frac_tokens"))


def received_attention(
    model,
    batches: Batch | Iterable[Batch],
    query: Selection = "text",
    key: Selection = "image",
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
    *,
    thresholds: Sequence[float] = (0.5, 0.8, 0.9),
    n_grid: int = 101,
    keep_received: bool = True,
    fwd_hooks: FwdHooks = None,
    progress: bool = True,
    query_chunk: int | None = None,
    journal=None,
) -> ReceivedAttentionResult:
    """Attention each ``key`` token receives from the ``query`` tokens, and how concentrated it is.

    ``r_j = sum_{i in Q} A_ij`` per layer and head for every key token ``j`` (all images of
    a row together); sorting ``r`` descending and normalising its cumulative sum gives the
    curve of seed 000 Fig. 2; ``frac_tokens`` is the fraction of key tokens that carries
    50% / 80% / 90% of the mass. Streams like `attention_share` (query rows only, no
    pattern). ``keep_received=False`` drops the per-token values (``layer x head x n_key``
    floats per example) for long runs.

    Args: see `attention_share` (``journal``, process groups too); ``heads`` selects heads
    (default all; the head mean is over the selection).
    """
    layer_list = select_layers(model, layers)
    head_list = select_heads(model, heads)
    thresholds = tuple(float(t) for t in thresholds)
    bad = [t for t in thresholds if not 0.0 < t <= 1.0]
    if bad or not thresholds:
        raise ValueError(f"thresholds must be fractions of the mass in (0, 1], got {list(thresholds)}")
    x = torch.linspace(0, 1, n_grid)
    hsel_on = OnDevice(torch.tensor(head_list, device=model.device))

    def one_batch(batch: Batch) -> dict:
        roles = model.roles(**batch)
        qmask = resolve(roles, query)
        kmask = resolve(roles, key).to(model.device)
        kpos = OnDevice(kmask.any(0).nonzero().squeeze(-1))  # key positions of any row
        hooks = user_hooks(fwd_hooks, batch, roles)
        qa = QueryAttention(model, layer_list, qmask,
                            lambda l, mass: mass[:, hsel_on.get(mass.device)][:, :, kpos.get(mass.device)],
                            other_hooks=hooks, query_chunk=query_chunk)
        run_forward(model, batch, hooks + qa.hooks())
        mass = torch.stack([qa.results[l].cpu() for l in layer_list], dim=1)  # [b, L, H, kpos]
        kmask_k, kpos_cpu = kmask[:, kpos.tensor].cpu(), kpos.tensor.cpu()
        part = {"received": [], "positions": [], "fracs": [], "fracs_mean": [], "curves": [],
                "head_curve_sum": torch.zeros(len(layer_list), len(head_list), n_grid, dtype=torch.float64),
                "head_curve_n": torch.zeros(len(layer_list), len(head_list), 1, dtype=torch.float64)}
        for row in range(mass.shape[0]):
            r = mass[row][..., kmask_k[row]]  # [L, H, n_key]
            part["positions"].append(kpos_cpu[kmask_k[row]])
            if keep_received:
                part["received"].append(r)
            if r.shape[-1] == 0:
                nan = float("nan")
                part["fracs"].append(torch.full((len(layer_list), len(head_list), len(thresholds)), nan))
                part["fracs_mean"].append(torch.full((len(layer_list), len(thresholds)), nan))
                part["curves"].append(torch.full((len(layer_list), n_grid), nan))
                continue
            cum, cum_mean = cumulative_mass(r), cumulative_mass(r.mean(1))
            part["fracs"].append(fraction_for_mass(cum, thresholds))
            part["fracs_mean"].append(fraction_for_mass(cum_mean, thresholds))
            part["curves"].append(curve_on_grid(cum_mean, x))
            head_curve = curve_on_grid(cum, x).double()
            ok = ~head_curve.isnan().any(-1, keepdim=True)
            part["head_curve_sum"] += head_curve.nan_to_num() * ok
            part["head_curve_n"] += ok
        return part

    with torch.no_grad():
        parts = map_batches(one_batch, batches, progress=progress, desc="received_attention", journal=journal)
    received, positions, fracs, fracs_mean, curves = ([r for p in parts for r in p[k]] for k in (
        "received", "positions", "fracs", "fracs_mean", "curves"))
    head_curve_sum = sum((p["head_curve_sum"] for p in parts), torch.zeros(()))
    head_curve_n = sum((p["head_curve_n"] for p in parts), torch.zeros(()))
    return ReceivedAttentionResult(
        received=received, positions=positions, frac_tokens=torch.stack(fracs),
        frac_tokens_head_mean=torch.stack(fracs_mean), curve=torch.stack(curves),
        curve_per_head_mean=(head_curve_sum / head_curve_n).float(), curve_x=x, layers=layer_list,
        heads=head_list, thresholds=thresholds, query=selection_label(query), key=selection_label(key))
