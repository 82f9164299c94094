"""circuitsvis attention widgets with image tokens collapsed or expanded, and
matplotlib per-head thumbnails.

Sources: an ``ActivationCache`` (or a dict of hook name -> tensor) plus ``layer``, or a
pattern tensor ``[batch, head, query, key]``, ``[head, query, key]`` or
``[query, key]``. Padding positions of the chosen row are dropped.

Collapsing (``collapse_images=True``): each image becomes one row and one column.
Column = the attention mass the query gives to the whole image (sum over its tokens);
row = the mean over the image's query tokens (so every row still sums to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mechvlm.roles import TokenRoles
from mechvlm.viz.html import Widget
from mechvlm.viz.labels import html_safe, image_label, row_spans, token_labels
from mechvlm.viz.text import plain

__all__ = ["pattern_of", "token_groups", "collapse", "attention_heads", "attention_pattern",
           "colored_tokens", "head_thumbnails"]


def pattern_of(source, layer: int | None = None, batch_index: int = 0) -> Tensor:
    """The pattern ``[head, query, key]`` (float64, cpu) of one batch row. ``source``: a
    tensor / array / nested list, or a cache (``ActivationCache`` or dict) with ``layer``."""
    if isinstance(source, (list, tuple, np.ndarray)):
        source = torch.as_tensor(np.asarray(source, dtype=np.float64))
    if not isinstance(source, Tensor):
        if layer is None:
            raise ValueError("reading a pattern from a cache needs layer=")
        name = f"blocks.{layer}.attn.hook_pattern"
        try:
            source = source[name]
        except (KeyError, TypeError) as e:
            raise KeyError(f"{name} is not in the cache; run_with_cache with it (names_filter)") from e
    p = source.detach().to("cpu", torch.float64)
    if p.ndim == 4:
        p = p[batch_index]
    elif p.ndim == 2:
        p = p[None]
    elif p.ndim != 3:
        raise ValueError(f"a pattern is [batch, head, q, k], [head, q, k] or [q, k]; got shape {tuple(p.shape)}")
    if p.shape[-1] != p.shape[-2]:
        raise ValueError(f"a pattern must be square in (query, key), got {tuple(p.shape)}")
    return p


def _select_heads(n_heads: int, heads) -> list[int]:
    if heads is None:
        return list(range(n_heads))
    hs = [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in hs if not -n_heads <= h < n_heads]
    if bad:
        raise IndexError(f"heads {bad} out of range for {n_heads} heads")
    return [h % n_heads for h in hs]


def token_groups(roles: TokenRoles | None, n: int, *, batch_index: int = 0, collapse_images: bool = True,
                 labels: Sequence[str] | None = None) -> tuple[list[list[int]], list[str]]:
    """Display groups (lists of positions) and their raw labels for one row: one group per
    real token, or one per image when collapsing. Padding is dropped."""
    if labels is None:
        labels = token_labels(roles, batch_index=batch_index, safe=False) if roles is not None \
            else [f"#{p}" for p in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} positions")
    keep = (~roles.pad[batch_index]).tolist() if roles is not None else [True] * n
    spans = row_spans(roles, batch_index) if (roles is not None and collapse_images) else []
    start_of = {s.start: s for s in spans}
    groups, names, p = [], [], 0
    while p < n:
        if p in start_of:
            s = start_of[p]
            groups.append(list(range(s.start, s.stop)))
            names.append(image_label(s, several=len(spans) > 1))
            p = s.stop
            continue
        if keep[p]:
            groups.append([p])
            names.append(labels[p])
        p += 1
    return groups, names


def collapse(pattern: Tensor, groups: list[list[int]]) -> Tensor:
    """``[..., q, k]`` -> ``[..., G, G]``: keys summed within a group, queries averaged."""
    g = len(groups)
    n = pattern.shape[-1]
    member = torch.zeros(g, n, dtype=pattern.dtype)
    for i, pos in enumerate(groups):
        member[i, pos] = 1.0
    mean_rows = member / member.sum(-1, keepdim=True)
    return mean_rows @ pattern @ member.T


def _round(x: Tensor, decimals: int) -> list:
    return np.round(x.numpy().astype(np.float64), decimals).tolist()


def _prepared(source, roles, layer, heads, batch_index, input_ids, tokenizer, collapse_images, labels):
    p = pattern_of(source, layer, batch_index)
    hs = _select_heads(p.shape[0], heads)
    n = p.shape[-1]
    if labels is None and roles is not None:
        labels = token_labels(roles, input_ids, tokenizer=tokenizer, batch_index=batch_index, safe=False)
    elif labels is None and input_ids is not None:
        ids = torch.as_tensor(input_ids)
        ids = ids[batch_index] if ids.ndim == 2 else ids
        labels = [tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t)) for t in ids]
    if roles is not None and roles.shape[1] != n:
        raise ValueError(f"the pattern has {n} positions, the roles {roles.shape[1]}")
    groups, names = token_groups(roles, n, batch_index=batch_index, collapse_images=collapse_images,
                                 labels=labels)
    shown = collapse(p[hs], groups)
    return shown, hs, names


def _causal_only(a: Tensor) -> bool:
    return bool((torch.triu(a, diagonal=1) <= 0).all())


def attention_heads(source, roles: TokenRoles | None = None, *, layer: int | None = None, heads=None,
                    batch_index: int = 0, input_ids=None, tokenizer=None, collapse_images: bool = True,
                    labels: Sequence[str] | None = None, decimals: int = 3, max_value: float | None = None,
                    mask_upper_tri: bool | None = None, title: str | None = None) -> Widget:
    """circuitsvis ``AttentionHeads``: a thumbnail per head, click one to see it large,
    and the tokens coloured by the focused head's attention.

    ``heads``: an int, a list, or None (all). Values are rounded to ``decimals``; the
    colour scale runs from 0 to ``max_value`` (default: the largest value shown).
    ``mask_upper_tri`` defaults to True unless something above the diagonal is non-zero
    (Gemma3's bidirectional image blocks, expanded). Labels come from ``roles`` (and
    ``input_ids`` / ``tokenizer`` for text), or ``labels`` (one per position).
    """
    shown, hs, names = _prepared(source, roles, layer, heads, batch_index, input_ids, tokenizer,
                                 collapse_images, labels)
    lay = f"L{layer}" if layer is not None else ""
    mx = float(shown.max()) if max_value is None else max_value
    props = dict(attention=_round(shown, decimals), tokens=[html_safe(s) for s in names],
                 attentionHeadNames=[f"{lay}H{h}" for h in hs], minValue=0.0,
                 maxValue=round(mx, decimals) or 1.0,
                 maskUpperTri=_causal_only(shown) if mask_upper_tri is None else mask_upper_tri)
    default = f"Layer {layer} attention" if layer is not None else "Attention"
    return Widget("AttentionHeads", props, title=title if title is not None else default)


def attention_pattern(source, roles: TokenRoles | None = None, *, layer: int | None = None, head="mean",
                      batch_index: int = 0, input_ids=None, tokenizer=None, collapse_images: bool = True,
                      labels: Sequence[str] | None = None, decimals: int = 3, max_value: float | None = None,
                      mask_upper_tri: bool | None = None, title: str | None = None) -> Widget:
    """circuitsvis ``AttentionPattern`` of one head (``head=int``) or of the mean over heads
    (``head="mean"``, or a list of heads to average)."""
    heads = None if head == "mean" else head
    shown, hs, names = _prepared(source, roles, layer, heads, batch_index, input_ids, tokenizer,
                                 collapse_images, labels)
    a = shown.mean(0)
    mx = float(a.max()) if max_value is None else max_value
    props = dict(attention=_round(a, decimals), tokens=[html_safe(s) for s in names], minValue=0.0,
                 maxValue=round(mx, decimals) or 1.0,
                 maskUpperTri=_causal_only(a) if mask_upper_tri is None else mask_upper_tri)
    which = f"head {hs[0]}" if len(hs) == 1 else f"mean of {len(hs)} heads"
    default = f"Layer {layer}, {which}" if layer is not None else which
    return Widget("AttentionPattern", props, title=title if title is not None else default)


def colored_tokens(values, roles: TokenRoles | None = None, *, batch_index: int = 0, input_ids=None,
                   tokenizer=None, labels: Sequence[str] | None = None, decimals: int = 4,
                   min_value: float | None = None, max_value: float | None = None,
                   negative_color: str | None = None, positive_color: str | None = None,
                   drop_padding: bool = True, title: str | None = None) -> Widget:
    """circuitsvis ``ColoredTokens`` for any per-token metric: ``values`` is ``[pos]`` or
    ``[batch, pos]`` (row ``batch_index``). Labels as in `token_labels`; NaN values (a
    metric undefined at a position) are shown as 0."""
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if v.ndim == 2:
        v = v[batch_index]
    if v.ndim != 1:
        raise ValueError(f"values must be [pos] or [batch, pos], got shape {tuple(v.shape)}")
    n = v.shape[0]
    if labels is None:
        if roles is not None:
            labels = token_labels(roles, input_ids, tokenizer=tokenizer, batch_index=batch_index, safe=False)
        else:
            labels = [f"#{p}" for p in range(n)] if input_ids is None else \
                [str(int(t)) for t in torch.as_tensor(input_ids).reshape(-1, n)[batch_index]]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} values")
    keep = list(range(n))
    if drop_padding and roles is not None:
        keep = [p for p in keep if not bool(roles.pad[batch_index, p])]
    v = torch.nan_to_num(v[keep], nan=0.0)
    props = dict(tokens=[html_safe(labels[p]) for p in keep], values=_round(v, decimals),
                 minValue=min_value, maxValue=max_value, negativeColor=negative_color,
                 positiveColor=positive_color)
    return Widget("ColoredTokens", props, title=title)


def head_thumbnails(source, roles: TokenRoles | None = None, *, layer: int | None = None, heads=None,
                    batch_index: int = 0, input_ids=None, tokenizer=None, collapse_images: bool = True,
                    labels: Sequence[str] | None = None, ncols: int = 4, size: float = 2.2,
                    cmap: str = "Blues", tick_labels: bool | None = None):
    """A matplotlib grid of small per-head patterns (query rows, key columns); returns the
    Figure. Tick labels are drawn when at most 24 rows are shown (or ``tick_labels``)."""
    import matplotlib.pyplot as plt

    shown, hs, names = _prepared(source, roles, layer, heads, batch_index, input_ids, tokenizer,
                                 collapse_images, labels)
    g = shown.shape[-1]
    ticks = g <= 24 if tick_labels is None else tick_labels
    ncols = max(1, min(ncols, len(hs)))
    nrows = -(-len(hs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    vmax = float(shown.max()) or 1.0
    for ax in axes.flat[len(hs):]:
        ax.axis("off")
    for i, h in enumerate(hs):
        ax = axes.flat[i]
        ax.imshow(shown[i].numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"L{layer}H{h}" if layer is not None else f"H{h}", fontsize=9)
        if ticks:
            ax.set_xticks(range(g), [plain(s) for s in names], rotation=90, fontsize=5)
            ax.set_yticks(range(g), [plain(s) for s in names], fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"Layer {layer} attention per head" if layer is not None else "Attention per head", fontsize=10)
    fig.tight_layout()
    return fig
