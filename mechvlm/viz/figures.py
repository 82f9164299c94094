"""matplotlib figures of the metric results (each returns a ``Figure``).

The functions read the result objects of `mechvlm.metrics` by their attributes:

- `fig_attention_share`: ``AttentionShareResult`` -> stacked bars of the share of each
  key role per layer (seed 000 Fig. 1).
- `fig_received_attention`: ``ReceivedAttentionResult`` -> cumulative received-attention
  curves for chosen layers (seed 000 Fig. 2-3), with the 50/80/90 % fractions.
- `fig_knockout` / `knockout_table_html`: a plain dict of accuracies (seed 000 Table 1;
  see `fig_knockout` for the expected input).
- `fig_logit_lens`: ``LogitLensResult`` -> top-1 token per (layer, image token) grid, and
  `fig_logit_lens_on_image`: the top-1 tokens of one layer on the image's token grid.
- `fig_visual_text_similarity`: ``VisualTextSimilarityResult`` -> cosine per layer.

Every function that plots one result also takes a dict ``{name: result}`` and draws one
panel per entry (e.g. one per model, as the seed's figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mechvlm.viz.text import plain


__all__ = ["fig_attention_share", "fig_received_attention", "fig_logit_lens", "fig_logit_lens_on_image",
           "fig_visual_text_similarity"]

_ROLE_NAMES = {"image": "image", "eoi": "EOI", "image_start": "BOI", "prefix": "prefix", "text": "text",
               "bos": "BOS", "last": "last", "real": "all", "register": "registers", "eoi+register": "registers"}


def _panels(results):
    if isinstance(results, Mapping):
        items = list(results.items())
    else:
        items = [(None, results)]
    if not items:
        raise ValueError("nothing to plot")
    return items


def _subplots(n: int, width: float, height: float):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _np(x) -> np.ndarray:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()


def _role(name: str) -> str:
    return _ROLE_NAMES.get(name, name)


def _layer_ticks(ax, layers, axis="x", max_ticks: int = 16):
    pos = np.arange(len(layers))
    step = max(1, int(np.ceil(len(layers) / max_ticks)))
    labels = [str(l) for l in layers]
    if axis == "x":
        ax.set_xticks(pos[::step], labels[::step])
    else:
        ax.set_yticks(pos[::step], labels[::step])


# --------------------------------------------------------------------- attention share --
def _share_matrix(result, reading) -> np.ndarray:
    if reading == "head_mean":
        return _np(result.mean_head_mean_share)
    if reading == "head_sum":
        return _np(result.mean_head_share)
    if isinstance(reading, int):
        return _np(result.mean_share)[:, reading, :]
    raise ValueError(f"reading must be 'head_mean', 'head_sum' or a head index, got {reading!r}")


def fig_attention_share(results, *, reading="head_mean", keys: Sequence[str] | None = None,
                        colors: Sequence[str] | None = None, width: float = 5.5, height: float = 3.2,
                        title: str | None = None):
    """Stacked bars per layer: the share of the query tokens' attention that goes to each
    key role (seed 000 Fig. 1: text -> image vs text -> EOI), averaged over examples.

    ``reading``: ``"head_mean"`` (per-head shares averaged over heads,
    ``mean_head_mean_share``), ``"head_sum"`` (share of the head-summed mass,
    ``mean_head_share``) or a head index, or a list of those (one per panel: the same
    result twice in ``results`` shows two readings). ``keys``: a subset / order of ``result.keys``.
    ``results``: one ``AttentionShareResult`` or ``{name: result}`` (one panel each).
    Layers whose share is undefined (NaN) are left empty.
    """
    items = _panels(results)
    fig, axes = _subplots(len(items), width, height)
    palette = colors or ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    readings = list(reading) if isinstance(reading, (list, tuple)) else [reading] * len(items)
    if len(readings) != len(items):
        raise ValueError(f"{len(readings)} readings given for {len(items)} panels")
    for ax, (name, res), reading in zip(axes, items, readings):
        share = _share_matrix(res, reading)  # [layer, key]
        order = list(res.keys) if keys is None else list(keys)
        idx = [list(res.keys).index(k) for k in order]
        x = np.arange(len(res.layers))
        bottom = np.zeros(len(x))
        for j, (k, i) in enumerate(zip(order, idx)):
            v = np.nan_to_num(share[:, i])
            ax.bar(x, v, bottom=bottom, width=0.85, color=palette[j % len(palette)],
                   label=plain(f"{res.query}\u2192{_role(k)}"), edgecolor="white", linewidth=0.3)
            bottom += v
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.6, len(x) - 0.4)
        _layer_ticks(ax, res.layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("attention share")
        how = f"head {reading}" if isinstance(reading, int) else reading.replace("_", " ")
        ax.set_title(plain(f"{name + ': ' if name else ''}{res.query} \u2192 key roles ({how})"), fontsize=10)
    # one legend right of the last panel when every panel shows the same key roles, else one
    # right of each panel (outside the axes: it covers no bar and no axis label)
    same = keys is not None or len({tuple(res.keys) for _, res in items}) == 1
    for ax in (axes[-1:] if same else axes):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ received attention --
def fig_received_attention(results, *, layers: Sequence[int] | None = None, head: int | None = None,
                           thresholds: bool = True, cmap: str = "viridis", width: float = 4.6,
                           height: float = 3.8, title: str | None = None):
    """Cumulative attention received by the image tokens (seed 000 Fig. 2-3): image tokens
    sorted by received attention (descending), cumulative share against the fraction of
    tokens, one curve per chosen layer (colour = depth), the uniform diagonal dashed.

    Curves: the example-mean ``result.mean_curve`` (the head-mean ``r`` per example), or
    with ``head`` the per-head curve averaged over examples (``curve_per_head_mean``).
    ``layers``: layer indices to draw (default all; at most ~12 stay readable).
    ``thresholds``: the legend gives the fraction of tokens carrying 50/80/90 % of the mass
    (``mean_frac_tokens``) per layer. ``results``: one result or ``{name: result}``.
    """
    import matplotlib

    items = _panels(results)
    fig, axes = _subplots(len(items), width, height)
    for ax, (name, res) in zip(axes, items):
        x = _np(res.curve_x)
        if head is None:
            curves = _np(res.mean_curve)
        else:
            curves = _np(res.curve_per_head_mean)[:, list(res.heads).index(head)]
        chosen = list(res.layers) if layers is None else list(layers)
        missing = [l for l in chosen if l not in res.layers]
        if missing:
            raise ValueError(f"layers {missing} were not measured (measured: {res.layers})")
        colors = matplotlib.colormaps[cmap](np.linspace(0, 0.9, max(1, len(chosen))))
        frac = _np(res.mean_frac_tokens) if (thresholds and head is None) else None
        for c, l in zip(colors, chosen):
            li = list(res.layers).index(l)
            label = f"L{l}"
            if frac is not None:
                label += " (" + "/".join(f"{v:.2f}" if np.isfinite(v) else "nan" for v in frac[li]) + ")"
            ax.plot(x, curves[li], color=c, lw=1.4, label=label)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(plain(f"fraction of {res.key} tokens (sorted by received attention)"))
        ax.set_ylabel(plain(f"cumulative share of {res.query}\u2192{_role(res.key)} attention"))
        who = f"head {head}" if head is not None else "head mean"
        ax.set_title(plain(f"{name + ': ' if name else ''}received attention ({who})"), fontsize=10)
        leg_title = ("layer (tokens for " + "/".join(f"{int(t * 100)}%" for t in res.thresholds) + ")"
                     if frac is not None else "layer")
        ax.legend(fontsize=7, title=leg_title, title_fontsize=7, loc="lower right",
                  ncol=1 if len(chosen) <= 8 else 2)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- knockout --
def _decode(tokenizer, i: int) -> str:
    if tokenizer is None:
        return str(i)
    if hasattr(tokenizer, "decode"):
        s = tokenizer.decode([i])
    else:
        s = str(tokenizer(i) if callable(tokenizer) else tokenizer[i])
    return plain(s.replace("\n", "\u21b5")) or "\u2205"


def _example_rows(res, example: int):
    sel = (res.example == example).nonzero(as_tuple=True)[0]
    if len(sel) == 0:
        raise ValueError(f"example {example} has no selected positions (examples: {res.n_examples})")
    return sel


def fig_logit_lens(result, *, example: int = 0, tokenizer=None, layers: Sequence | None = None,
                   roles=None, batch_index: int | None = None, max_positions: int = 48,
                   annotate: bool | None = None, cmap: str = "Blues", width: float | None = None,
                   height: float | None = None, title: str | None = None):
    """Logit-lens grid of one example: rows = layers (``"embed"`` first), columns = the
    selected (image) positions, colour = top-1 probability, text = the top-1 token
    (decoded with ``tokenizer``, else the id). Cells whose top-k hits the label set are
    outlined. With labels, a side panel plots the per-layer alignment (all examples).
    ``roles`` (of the example's batch; row ``batch_index``, default ``example``) names the
    columns by grid cell (``r,c``) instead of position. ``max_positions``: the first
    positions shown (long image runs get unreadable)."""
    import matplotlib.pyplot as plt

    res = result
    sel = _example_rows(res, example)[:max_positions]
    li = list(range(len(res.layers))) if layers is None else [list(res.layers).index(l) for l in layers]
    probs = _np(res.top_probs[sel][:, li, 0]).T  # [layer, position]
    ids = res.top_ids[sel][:, li, 0].T.tolist()
    pos = res.position[sel].tolist()
    L, P = probs.shape
    annotate = (P <= 24 and L <= 40) if annotate is None else annotate
    has_hits = res.hits is not None
    w = width or min(22, 1.4 + 0.42 * P) + (2.6 if has_hits else 0)
    h = height or min(16, 1.2 + 0.3 * L)
    if has_hits:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(w, h), gridspec_kw={"width_ratios": [max(P, 4), 5]})
    else:
        fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(probs, cmap=cmap, vmin=0, vmax=max(1e-6, float(np.nanmax(probs))), aspect="auto",
                   interpolation="nearest")
    if annotate:
        for r in range(L):
            for c in range(P):
                ax.text(c, r, _decode(tokenizer, ids[r][c])[:8], ha="center", va="center", fontsize=6,
                        color="white" if probs[r, c] > 0.6 * np.nanmax(probs) else "black")
    if has_hits:
        hits = res.hits[sel][:, li].T.numpy()
        for r, c in zip(*np.nonzero(hits)):
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="#C44E52", lw=1.2))
    if roles is not None:
        from mechvlm.viz.labels import row_spans, token_labels

        row = example if batch_index is None else batch_index
        names = token_labels(roles, batch_index=row, safe=False)
        several = len(row_spans(roles, row)) > 1

        def cell(p: int) -> str:
            if not bool(roles.image[row, p]) or int(roles.grid_row[row, p]) < 0:
                return names[p]
            rc = f"{int(roles.grid_row[row, p])},{int(roles.grid_col[row, p])}"
            tile = int(roles.grid_tile[row, p])
            rc = f"t{tile}:{rc}" if tile > 0 else rc
            return f"i{int(roles.image_index[row, p])}:{rc}" if several else rc

        ax.set_xticks(range(P), [cell(p) for p in pos], rotation=90, fontsize=6)
        ax.set_xlabel(plain(f"{res.positions} token: grid row,col (example {example})"))
    else:
        ax.set_xticks(range(P), [str(p) for p in pos], rotation=90, fontsize=6)
        ax.set_xlabel(plain(f"{res.positions} position (example {example})"))
    ax.set_yticks(range(L), [str(res.layers[i]) for i in li], fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="top-1 probability")
    ax.set_title(title or "Logit lens: top-1 token per layer and position", fontsize=10)
    if has_hits:
        al = _np(res.alignment)[li]
        ax2.plot(al, range(L), marker="o", ms=3, color="#C44E52")
        ax2.set_ylim(L - 0.5, -0.5)
        ax2.set_yticks(range(L), [str(res.layers[i]) for i in li], fontsize=7)
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("alignment (top-k hits labels)")
        ax2.grid(alpha=0.3)
        ax2.set_title("semantic alignment", fontsize=10)
    fig.tight_layout()
    return fig


def fig_logit_lens_on_image(result, roles, *, layer, example: int = 0, batch_index: int | None = None,
                            tokenizer=None, image=None, cfg=None, rank: int = 0, alpha: float = 0.6,
                            size: float = 4.0, title: str | None = None):
    """The logit lens of one layer laid on the image's token grid (Neo et al.): each cell
    shows the rank-``rank`` token of that image token, coloured by its probability, over
    the (resized) input image if given. ``roles``: the roles of the batch the example came
    from; ``batch_index``: its row there (default ``example``). One panel per image."""

    from mechvlm.image_layout import view_positions
    from mechvlm.viz.image import _shown_image, image_panels, model_pixel_size

    res = result
    row = example if batch_index is None else batch_index
    li = list(res.layers).index(layer)
    sel = _example_rows(res, example)
    pos = res.position[sel].tolist()
    prob = dict(zip(pos, _np(res.top_probs[sel][:, li, rank]).tolist()))
    tok = dict(zip(pos, res.top_ids[sel][:, li, rank].tolist()))
    hit = dict(zip(pos, res.hits[sel][:, li].tolist())) if res.hits is not None else {}
    panels = [p for p in image_panels(torch.zeros(roles.shape[1]), roles, batch_index=row)
              if any(q in prob for q in view_positions(p.span, p.view).reshape(-1).tolist())]
    if not panels:
        raise ValueError(f"no image token of row {row} was read by the logit lens")
    spans = list(dict.fromkeys(p.span for p in panels))
    images = dict(zip(spans, image if isinstance(image, (list, tuple)) else [image] * len(spans)))
    fig, axes = _subplots(len(panels), size, size)
    for ax, panel in zip(axes, panels):
        s, img = panel.span, images[panel.span]
        cells = view_positions(s, panel.view)[panel.frame or 0]  # [h, w] token positions
        h, w = cells.shape
        H, W = model_pixel_size(s, cfg, panel.view)
        grid = np.full((h, w), np.nan)
        for (r, c), p in np.ndenumerate(cells.numpy()):
            if p in prob:
                grid[r, c] = prob[p]
        if img is not None:
            ax.imshow(_shown_image(img, panel, cfg, (H, W)), extent=(0, W, H, 0))
        ax.imshow(grid, extent=(0, W, H, 0), cmap="Blues", vmin=0, vmax=1,
                  alpha=alpha if img is not None else 1.0, interpolation="nearest")
        fs = max(4, min(9, int(180 / max(h, w))))
        for (r, c), p in np.ndenumerate(cells.numpy()):
            if p not in tok:
                continue
            ax.text((c + 0.5) * W / w, (r + 0.5) * H / h, _decode(tokenizer, tok[p])[:6], ha="center",
                    va="center", fontsize=fs, color="#C44E52" if hit.get(p) else "black",
                    fontweight="bold" if hit.get(p) else "normal")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{panel.title.split(':')[0]}, layer {layer}", fontsize=9)
    fig.suptitle(title or f"Logit lens on the image grid (rank-{rank} token; red: top-k hits the labels)", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------- visual-text similarity --
def fig_visual_text_similarity(results, *, stat: str = "both", show_examples: bool = False,
                               width: float = 5.5, height: float = 3.4, title: str | None = None):
    """Cosine similarity of image-token hidden states to text embeddings per layer
    (METHODS §7): the example-mean ``max`` and/or ``mean`` cosine (``stat``: ``"max"``,
    ``"mean"``, ``"both"``), thin lines per example with ``show_examples``. ``results``:
    one ``VisualTextSimilarityResult`` or ``{name: result}`` (drawn on the same axes, e.g.
    several models or both references)."""
    import matplotlib.pyplot as plt

    items = _panels(results)
    if stat not in ("max", "mean", "both"):
        raise ValueError(f"stat must be 'max', 'mean' or 'both', got {stat!r}")
    fig, ax = plt.subplots(figsize=(width, height))
    layers0 = list(items[0][1].layers)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (name, res) in enumerate(items):
        if list(res.layers) != layers0:
            raise ValueError("results drawn together must share their layers")
        x = np.arange(len(res.layers))
        color = colors[n % len(colors)]
        for s, ls in (("max", "-"), ("mean", "--")):
            if stat not in (s, "both"):
                continue
            per_ex = _np(getattr(res, s))
            if show_examples:
                for row in per_ex:
                    ax.plot(x, row, color=color, lw=0.5, alpha=0.3, ls=ls)
            mean = np.nanmean(per_ex, 0) if len(per_ex) else np.full(len(x), np.nan)
            ax.plot(x, mean, color=color, ls=ls, marker="o", ms=3, lw=1.5,
                    label=plain(f"{name + ': ' if name else ''}{s} cos ({res.reference})"))
    _layer_ticks(ax, layers0)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    res0 = items[0][1]
    ax.set_title(title or plain(f"{res0.image} hidden states vs {res0.text} embeddings"), fontsize=10)
    fig.tight_layout()
    return fig
