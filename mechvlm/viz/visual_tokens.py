"""Figures of the visual-token analyses (`mechvlm.analyses`; seeds 001 and 003).

- `fig_token_budget`: ``TokenBudgetResult`` -> loss vs fraction of image tokens kept, one
  curve per strategy (error bars: std over draws), the full input as a dashed line.
- `fig_contribution`: ``ContributionResult`` -> the loss increase of each unit over the
  image (the placement of `attention_on_image`, via `grids_on_image`).
- `fig_token_categories`: ``TokenCategoriesResult`` -> sink / dead / alive on the image.
- `fig_category_fractions`: ``TokenCategoriesResult`` -> the fraction of each category per
  image, and of massive-activation tokens per layer.

`fig_token_budget` and `fig_category_fractions` also take ``{name: result}`` (one panel each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mechvlm.viz.figures import _np, _panels, _subplots
from mechvlm.viz.image import grids_on_image

__all__ = ["fig_token_budget", "fig_contribution", "fig_token_categories", "fig_category_fractions"]

CATEGORY_COLORS = ["#4daf4a", "#e41a1c", "#377eb8"]  # alive green, sink red, dead blue


def fig_token_budget(results, *, title: str | None = None):
    """Loss of the target tokens vs the fraction of image tokens kept (mean over images),
    one curve per strategy with the std over draws as error bars."""
    items = _panels(results)
    fig, axes = _subplots(len(items), 4.6, 3.4)
    for ax, (name, res) in zip(axes, items):
        x = _np(res.kept_fraction)
        mean, std = _np(res.mean_loss), _np(res.std_loss)
        for s, strategy in enumerate(res.strategies):
            ax.errorbar(x, mean[s], yerr=std[s], marker="o", ms=3, capsize=2, label=strategy)
        ax.axhline(float(np.nanmean(_np(res.full_loss))), color="grey", ls="--", lw=1, label="all tokens")
        ax.set_xlabel("fraction of image tokens kept")
        ax.set_ylabel("answer loss (nats)")
        ax.set_title(f"{name + ': ' if name else ''}tokens {res.mode}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Visual-token budget vs loss (seed 001)", fontsize=10)
    fig.tight_layout()
    return fig


def _pick(n: int, which) -> list[int]:
    which = list(range(min(n, 3))) if which is None else ([which] if isinstance(which, int) else list(which))
    bad = [i for i in which if not 0 <= i < n]
    if bad:
        raise ValueError(f"image indices {bad} out of range (the result holds {n} images)")
    return which


def _frames(grid) -> np.ndarray:
    g = _np(grid)
    return np.nanmean(g, axis=0) if g.shape[0] > 1 else g[0]


def fig_contribution(result, images=None, *, which: int | Sequence[int] | None = None, cfg=None,
                     cmap: str = "coolwarm", title: str | None = None, **kwargs):
    """The contribution map of images ``which`` (indices into ``result.maps``; default the
    first three) over their pictures (``images``: one per shown image, or None). A
    diverging scale centred on 0: red = dropping the unit raises the loss."""
    which = _pick(len(result.maps), which)
    grids = [(result.spans[i], _frames(result.maps[i])) for i in which]
    m = max(float(np.nanmax(np.abs(g))) for _, g in grids) or 1.0
    imgs = None if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    titles = [f"example {int(result.example[i])}" for i in which]
    return grids_on_image(grids, imgs, cfg=cfg, cmap=cmap, vmin=-m, vmax=m, panel_titles=titles,
                          title=title or f"Loss increase when one {result.unit} is {result.mode}", **kwargs)


def fig_token_categories(result, images=None, *, which: int | Sequence[int] | None = None, cfg=None,
                         title: str | None = None, **kwargs):
    """Sink / dead / alive of images ``which`` on their pictures."""
    from mechvlm.analyses.token_categories import CATEGORIES

    which = _pick(len(result.category), which)
    grids = [(result.spans[i], _frames(result.grid(i))) for i in which]
    imgs = None if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    titles = [f"example {int(result.example[i])}" for i in which]
    return grids_on_image(grids, imgs, cfg=cfg, labels=list(CATEGORIES), cmap=CATEGORY_COLORS, alpha=0.6,
                          panel_titles=titles, title=title or f"Visual token categories ({result.criterion})",
                          **kwargs)


def fig_category_fractions(results, *, title: str | None = None):
    """Per image, the stacked fractions of alive / sink / dead; with the massive-activation
    criterion, a second panel with the fraction of massive tokens at each checked layer."""
    from mechvlm.analyses.token_categories import CATEGORIES

    items = _panels(results)
    n_panels = sum(1 + (r.sink_by_layer is not None) for _, r in items)
    fig, axes = _subplots(n_panels, 4.2, 3.2)
    axes = iter(axes)
    for name, res in items:
        ax = next(axes)
        fr = _np(res.fractions)
        bottom = np.zeros(len(fr))
        for c, label in enumerate(CATEGORIES):
            ax.bar(np.arange(len(fr)), fr[:, c], bottom=bottom, color=CATEGORY_COLORS[c], label=label)
            bottom += fr[:, c]
        ax.set_xlabel("image")
        ax.set_ylabel("fraction of tokens")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name + ': ' if name else ''}{res.criterion}", fontsize=9)
        ax.legend(fontsize=7)
        if res.sink_by_layer is not None:
            ax = next(axes)
            lf = _np(res.layer_sink_fraction)
            ax.plot(res.layers, lf.mean(0), marker="o", color=CATEGORY_COLORS[1], label="mean over images")
            ax.fill_between(res.layers, lf.min(0), lf.max(0), color=CATEGORY_COLORS[1], alpha=0.2, label="min-max")
            ax.set_xticks(res.layers)
            ax.set_xlabel("layer (residual entering it)")
            ax.set_ylabel("massive-activation fraction")
            ax.set_ylim(0, 1)
            ax.set_title(f"threshold {res.settings['threshold']}, sink dims {res.settings['sink_dims'][:6]}",
                         fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title or "Sink / dead / alive visual tokens (seed 003)", fontsize=10)
    fig.tight_layout()
    return fig
