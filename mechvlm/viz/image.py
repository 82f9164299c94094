"""Attention on the image: the mass each image token receives, drawn over the input
image at its grid cell.

Geometry. Each image's tokens form a merged grid ``(t, h, w)`` (`TokenRoles.spans`),
token ``(row, col)`` from ``roles.grid_row / grid_col``.

- Qwen2.5-VL: the processor resized the image to ``h*patch*merge x w*patch*merge``
  pixels (patch 14, merge 2: 28 px per LM token) without cropping, so the original
  image is resized to that size and cell ``(r, c)`` covers pixels
  ``[28r, 28r+28) x [28c, 28c+28)``.
- Gemma3: the image is resized to a ``image_size`` square (896 for the real
  checkpoints; no crop) and pooled to ``sqrt(mm_tokens)`` squared tokens, so the grid is
  square over the square image.
- Qwen2.5-VL videos: one panel per frame (temporal patch ``t``, ``temporal_patch_size``
  frames each) unless ``frames="mean"``.
- LLaVA-1.5: the CLIP processor resizes the short side and crops the centre square, so
  the grid covers the centre square of the image.
- LLaVA-NeXT / OneVision (anyres): two panels per image: the overview (the whole image
  squashed to one tile) and the stitched tiles (the cropped canvas keeps the image's
  aspect ratio; newline tokens are not drawn).

`image_panels` / `image_grids` place per-position values on the grids; `heat_pixels` /
`overlay` are the pixel-exact numpy versions of what `attention_on_image` draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mechvlm.image_layout import GridView, ImageSpan, view_positions
from mechvlm.roles import TokenRoles
from mechvlm.viz.attention import _select_heads, pattern_of
from mechvlm.viz.html import figure_to_img_html
from mechvlm.viz.labels import row_spans
from mechvlm.viz.pixels import _center_square, heat_pixels, overlay, resize_to_grid
from mechvlm.viz.text import plain

__all__ = ["QWEN_PATCH", "ImagePanel", "received_per_position", "image_panels", "image_grids",
           "model_pixel_size", "resize_to_grid", "heat_pixels", "overlay", "attention_on_image",
           "attention_on_image_html", "attention_on_image_layers", "grids_on_image"]

QWEN_PATCH = 14
_LLAVA = ("llava", "llava_next", "llava_onevision")


def _query_mask(roles: TokenRoles, queries, batch_index: int) -> Tensor:
    n = roles.shape[1]
    if isinstance(queries, Tensor) and queries.dtype != torch.bool:
        queries = queries.tolist()
    if isinstance(queries, (list, tuple, range)) and queries and all(isinstance(q, int) for q in queries):
        m = torch.zeros(n, dtype=torch.bool)
        m[list(queries)] = True
        return m
    if isinstance(queries, Tensor) and queries.ndim == 1:
        if queries.shape[0] != n:
            raise ValueError(f"a query mask of one row must have {n} entries, got {queries.shape[0]}")
        return queries.cpu()
    return roles.mask(queries)[batch_index].cpu()


def received_per_position(source, roles: TokenRoles, *, layer: int | None = None, heads=None,
                          queries="text", batch_index: int = 0, head_reduce: str = "mean") -> Tensor:
    """``r[k] = sum_{q in queries} A[h, q, k]``, reduced over ``heads`` (``"mean"`` or
    ``"sum"``): ``[pos]`` float64 for row ``batch_index``.

    ``source``: a cache (with ``layer``) or a pattern tensor (see `pattern_of`).
    ``queries``: a role name, a list of role names / boolean masks ``[batch, pos]``, a
    boolean ``[pos]`` mask, or a list of positions.
    """
    p = pattern_of(source, layer, batch_index)
    hs = _select_heads(p.shape[0], heads)
    q = _query_mask(roles, queries, batch_index)
    if not bool(q.any()):
        raise ValueError(f"the query set {queries!r} is empty in row {batch_index}")
    r = p[hs][:, q, :].sum(1)
    if head_reduce == "mean":
        return r.mean(0)
    if head_reduce == "sum":
        return r.sum(0)
    raise ValueError(f"head_reduce must be 'mean' or 'sum', got {head_reduce!r}")


@dataclass
class ImagePanel:
    """One heatmap: a view of an image (or one frame of a video) and its values ``[rows, cols]``."""

    span: ImageSpan
    view: GridView
    frame: int | None
    grid: np.ndarray

    @property
    def title(self) -> str:
        _, h, w = self.view.grid
        name = f"{self.span.modality} {self.span.image}"
        if self.view.name not in ("image", "base") or self.span.views:
            name += f" {self.view.name}"
        if self.frame is not None:
            name += f" frame {self.frame}"
        elif self.view.grid[0] > 1:
            name += f" ({self.view.grid[0]} frames, mean)"
        return f"{name}: {h}\u00d7{w} tokens"


def image_panels(values, roles: TokenRoles, *, batch_index: int = 0, frames: str | None = None) -> list[ImagePanel]:
    """Per-position values (``[pos]`` or ``[batch, pos]``) on every grid of the images and
    videos of row ``batch_index``, in sequence order: one panel per view (anyres: the
    overview, then the stitched tiles; newline tokens left out) and, for a grid with
    several frames, per frame (``frames="each"``, the default for videos) or one panel
    averaged / summed over the frames (``"mean"``, the default for images, or ``"sum"``)."""
    if frames not in (None, "each", "mean", "sum"):
        raise ValueError(f"frames must be 'each', 'mean' or 'sum', got {frames!r}")
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if v.ndim == 2:
        v = v[batch_index]
    if v.shape[-1] != roles.shape[1]:
        raise ValueError(f"values have {v.shape[-1]} positions, the roles {roles.shape[1]}")
    out = []
    for s in row_spans(roles, batch_index):
        mode = frames or ("each" if s.modality == "video" else "mean")
        for view in s.grid_views:
            t, h, w = view.grid
            if h * w == 0:  # a lone newline token
                continue
            if s.cells is None:
                g = v[view_positions(s, view)].numpy()
            else:  # some tokens were removed (image_cells): 0 on their cells
                g = np.zeros(t * h * w)
                g[list(s.cells)] = v[s.start:s.stop].numpy()
                g = g.reshape(t, h, w)
            if mode == "each" and t > 1:
                out += [ImagePanel(s, view, f, g[f]) for f in range(t)]
            else:
                out.append(ImagePanel(s, view, None, g.mean(0) if mode != "sum" else g.sum(0)))
    return out


def image_grids(values, roles: TokenRoles, *, batch_index: int = 0,
                frames: str = "mean") -> list[tuple[ImageSpan, np.ndarray]]:
    """Per-position values (``[pos]`` or ``[batch, pos]``) placed on each image's merged
    grid: ``[(span, array [h, w])]`` for the images of row ``batch_index``, in sequence
    order; an anyres image gives one entry per view (see `image_panels`). A grid with
    several frames (``t > 1``) is averaged over them (``frames="mean"``), summed
    (``"sum"``) or split (``"each"``: one entry per frame)."""
    return [(p.span, p.grid) for p in image_panels(values, roles, batch_index=batch_index, frames=frames)]


def model_pixel_size(span: ImageSpan, cfg=None, view: GridView | None = None) -> tuple[int, int]:
    """``(height, width)`` of the image (its ``view``, default the first) as the model's
    processor resized it."""
    view = view or span.grid_views[0]
    _, h, w = view.grid
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gemma3" and cfg.extra.get("image_size"):
        size = int(cfg.extra["image_size"])
        return size, size
    if model_type in _LLAVA:
        px = int(cfg.extra["tile_pixels"])
        if view.tiles is None:
            return px, px
        cell = px / cfg.extra["tile_side"]
        sy, sx = view.tiles.scale
        return round(h * sy * cell), round(w * sx * cell)
    merge = cfg.spatial_merge_size if cfg is not None else 2
    return h * QWEN_PATCH * merge, w * QWEN_PATCH * merge


def _shown_image(image, panel: ImagePanel, cfg, size: tuple[int, int]) -> np.ndarray:
    """The input image as the panel's grid saw it, resized to ``size``."""
    if isinstance(image, (list, tuple)) or (isinstance(image, (np.ndarray, Tensor)) and image.ndim == 4):
        frame = panel.frame or 0  # a video given as its frames: the first frame of the temporal patch
        image = image[min(len(image) - 1, frame * len(image) // max(1, panel.view.grid[0]))]
    if getattr(cfg, "model_type", None) == "llava" and panel.view.tiles is None:
        image = _center_square(image)  # CLIP's shortest-edge resize + centre crop
    return resize_to_grid(image, size)


def _images_for(spans: list[ImageSpan], images) -> list:
    if images is None:
        return [None] * len(spans)
    if isinstance(images, dict):
        return [images.get(s.image) for s in spans]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) != len(spans):
        raise ValueError(f"{len(images)} image(s) given for the {len(spans)} image(s) of the row "
                         "(pass a list in sequence order, or a dict image_index -> image)")
    return list(images)


def _is_values(src, roles: TokenRoles) -> bool:
    """Per-position values (``[pos]``, or ``[batch, pos]`` that is not square) rather than a
    pattern; a square 2-D tensor is read as a ``[query, key]`` pattern."""
    if not isinstance(src, Tensor):
        return False
    if src.ndim == 1:
        return True
    return src.ndim == 2 and tuple(src.shape) == tuple(roles.shape) and src.shape[0] != src.shape[1]


def attention_on_image(source, roles: TokenRoles, images=None, *, layer: int | None = None, heads=None,
                       queries="text", batch_index: int = 0, cfg=None, head_reduce: str = "mean",
                       cmap: str = "inferno", alpha: float = 0.55, share_scale: bool = True,
                       show_grid: bool = False, min_side: int = 224, size: float = 3.6,
                       title: str | None = None, frames: str | None = None):
    """Heatmap of the attention each image token receives, over the input image(s).

    ``source``: a cache + ``layer``, a pattern (``[batch, head, q, k]`` ...), or
    precomputed per-position values ``[pos]`` / ``[batch, pos]`` (e.g. a received-
    attention vector; ``heads`` / ``queries`` are then ignored; a square 2-D tensor is
    read as a ``[query, key]`` pattern). ``images``: the original
    images of row ``batch_index`` (PIL, arrays or tensors), a list in sequence order or
    a dict ``image_index -> image``, or None (the heat alone, opaque). Each is resized to the
    processor's size (`model_pixel_size`, from ``cfg`` = ``model.cfg``; without it 28 px
    per token); when that is small (tiny configs) it is upsampled by an integer factor to
    at least ``min_side`` pixels on its long side, for display only (the data coordinates
    stay the processor's pixels). ``share_scale``: one colour scale for all images.
    Returns a Figure with one panel per image; per frame for a video (``frames="mean"``:
    one panel per video; a video in ``images`` may be given as its list of frames); two
    per anyres image (overview, tiles), see `image_panels`. Six panels per figure row.
    """
    src = torch.as_tensor(source) if isinstance(source, (np.ndarray, list)) else source
    if _is_values(src, roles):
        values = src
        what = "values"
    else:
        values = received_per_position(src, roles, layer=layer, heads=heads, queries=queries,
                                       batch_index=batch_index, head_reduce=head_reduce)
        qname = queries if isinstance(queries, str) else "chosen queries"
        hname = "all heads" if heads is None else f"heads {heads}"
        what = f"attention from {qname} ({head_reduce} over {hname})"
    panels = image_panels(values, roles, batch_index=batch_index, frames=frames)
    if not panels:
        raise ValueError(f"row {batch_index} holds no image")
    lay = f"Layer {layer}: " if layer is not None else ""
    return grids_on_image(panels, images, cfg=cfg, cmap=cmap, alpha=alpha, share_scale=share_scale,
                          show_grid=show_grid, min_side=min_side, size=size,
                          title=title if title is not None else plain(f"{lay}{what}"))


def grids_on_image(grids: list[ImagePanel | tuple[ImageSpan, np.ndarray]], images=None, *, cfg=None,
                   cmap="inferno", alpha: float = 0.55, share_scale: bool = True, show_grid: bool = False,
                   min_side: int = 224, size: float = 3.6, title: str | None = None, vmin: float | None = 0.0,
                   vmax: float | None = None, labels: list[str] | None = None, panel_titles: list[str] | None = None):
    """Values on image grids drawn over the images, one panel per grid: `ImagePanel`s (see
    `image_panels`: views of anyres images, video frames) or ``(span, array [h, w])`` pairs
    (the span's first view); the placement `attention_on_image` uses (each image resized to
    the processor's size, `model_pixel_size`). ``images``: one per distinct span, as in
    `attention_on_image`. ``vmin`` / ``vmax``: the colour range (None: the values' min /
    max over the shared panels; NaN cells are left transparent). ``labels``: the grid holds
    integer codes ``0 .. len(labels) - 1`` (categories), shown with a discrete colour bar
    (``cmap``: a list of colours, one per label; default tab10's).
    ``panel_titles`` replace the default "image k: h×w tokens". Six panels per figure row.
    Returns a Figure."""
    import matplotlib.cm
    import matplotlib.colors
    import matplotlib.pyplot as plt

    if not grids:
        raise ValueError("no image grid to draw")
    panels = [p if isinstance(p, ImagePanel) else ImagePanel(p[0], p[0].grid_views[0], None, np.asarray(p[1]))
              for p in grids]
    spans = list(dict.fromkeys(p.span for p in panels))
    imgs = dict(zip(spans, _images_for(spans, images)))
    finite = [p.grid[np.isfinite(p.grid)] for p in panels]
    if labels is not None:
        vmin, vmax = -0.5, len(labels) - 0.5
        colors = cmap if isinstance(cmap, (list, tuple)) else matplotlib.colormaps["tab10"].colors[:len(labels)]
        cmap = matplotlib.colors.ListedColormap(list(colors))
    vmin_all = min((float(f.min()) for f in finite if f.size), default=0.0)
    vmax_all = max((float(f.max()) for f in finite if f.size), default=1.0)
    ncols = min(len(panels), 6)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.8, size * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for i, (ax, panel) in enumerate(zip(axes.flat, panels)):
        g, img = panel.grid, imgs[panel.span]
        H, W = model_pixel_size(panel.span, cfg, panel.view)
        k = max(1, -(-min_side // max(H, W)))
        if img is not None:
            ax.imshow(_shown_image(img, panel, cfg, (H * k, W * k)), extent=(0, W, H, 0), interpolation="bilinear")
        else:
            ax.imshow(np.zeros((H, W, 3), np.uint8), extent=(0, W, H, 0))
        f = g[np.isfinite(g)]
        lo = vmin if vmin is not None else (vmin_all if share_scale else float(f.min()) if f.size else 0.0)
        hi = vmax if vmax is not None else (vmax_all if share_scale else float(f.max()) if f.size else 1.0)
        if hi <= lo:
            hi = lo + 1.0
        im = ax.imshow(np.ma.masked_invalid(g), extent=(0, W, H, 0), cmap=cmap,
                       alpha=alpha if img is not None else 1.0, vmin=lo, vmax=hi, interpolation="nearest")
        if show_grid:
            h, w = g.shape
            for r in range(1, h):
                ax.axhline(r * H / h, color="white", lw=0.3, alpha=0.5)
            for c in range(1, w):
                ax.axvline(c * W / w, color="white", lw=0.3, alpha=0.5)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel_titles[i] if panel_titles is not None else panel.title, fontsize=9)
        opaque = matplotlib.cm.ScalarMappable(norm=im.norm, cmap=im.get_cmap())  # alpha-free colour bar
        bar = fig.colorbar(opaque, ax=ax, fraction=0.046, pad=0.03)
        if labels is not None:
            bar.set_ticks(range(len(labels)), labels=labels)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    return fig


def attention_on_image_html(*args, alt: str = "attention on image", dpi: int | None = None, **kwargs) -> str:
    """`attention_on_image` as an embeddable ``<img>`` (base64 PNG); the figure is closed."""
    return figure_to_img_html(attention_on_image(*args, **kwargs), alt=alt, dpi=dpi, close=True)


def attention_on_image_layers(grids: Sequence[np.ndarray], layers: Sequence[int], image=None, *,
                              span: ImageSpan | None = None, cfg=None, cmap: str = "inferno",
                              alpha: float = 0.6, min_side: int = 224, size: float = 2.2,
                              label: str = "mean attention weight", title: str | None = None):
    """One image's heatmaps in several layers, side by side on **one shared colour scale**
    (0 .. the row's maximum, one colour bar for the row): ``grids[i]`` is the ``[h, w]``
    grid of layer ``layers[i]`` (e.g. from `image_grids`). ``span`` + ``cfg`` give the
    processor's pixel size (`model_pixel_size`; without them 28 px per token). Each panel
    is titled ``layer L``; ``label`` names the colour unit. Returns a Figure."""
    import matplotlib.cm
    import matplotlib.pyplot as plt

    if len(grids) != len(layers) or not len(grids):
        raise ValueError(f"one grid per layer expected, got {len(grids)} grids for layers {list(layers)}")
    h, w = np.asarray(grids[0]).shape
    H, W = model_pixel_size(span, cfg) if span is not None else (28 * h, 28 * w)
    vmax = max(float(np.max(g)) for g in grids) or 1.0
    fig, axes = plt.subplots(1, len(grids), figsize=(size * len(grids) + 1.0, size + 0.35), squeeze=False)
    k = max(1, -(-min_side // max(H, W)))
    base = resize_to_grid(image, (H * k, W * k)) if image is not None else None
    im = None
    for ax, g, layer in zip(axes[0], grids, layers):
        if base is not None:
            ax.imshow(base, extent=(0, W, H, 0), interpolation="bilinear")
        im = ax.imshow(np.asarray(g), extent=(0, W, H, 0), cmap=cmap, vmin=0.0, vmax=vmax,
                       alpha=alpha if base is not None else 1.0, interpolation="nearest")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"layer {layer}", fontsize=9)
    opaque = matplotlib.cm.ScalarMappable(norm=im.norm, cmap=im.get_cmap())
    bar = fig.colorbar(opaque, ax=list(axes[0]), fraction=0.025, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
