"""Where each image (or video) sits in the token sequence, validated against the grids.

An `ImageSpan` is one image's (or one video's) run of placeholder tokens. Spans of one
modality are listed in the order its vision features arrive (batch row by row, left to
right), which is the order of ``image_grid_thw`` / ``video_grid_thw`` and of HF's
``masked_scatter``; a family returns its image spans first, then its video spans. Token
roles, mRoPE positions and heatmaps over the image all read the spans instead of
re-deriving them.

Most images are one grid of tokens, row-major (`ImageSpan.grid`). An image whose tokens
form several grids (LLaVA-NeXT / OneVision anyres: an overview grid, then the tiles
stitched into one grid with a newline token closing each row) lists them as `GridView`s;
`span_cells` gives every token its cell: frame, tile, row and column within the tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass(frozen=True)
class TileMap:
    """How the cells of a stitched view map onto anyres tiles.

    The view's cell ``(r, c)`` lies on the canvas of all tiles (``tile_grid`` tiles of
    ``tile_size`` cells each, row-major) at ``(top + floor((r + 0.5) * scale_y), left +
    floor((c + 0.5) * scale_x))``: ``top``/``left`` is what unpadding cropped, ``scale``
    the canvas cells per view cell when the view was downsampled (OneVision's anyres-max;
    1.0 otherwise, so the canvas cell is ``(top + r, left + c)``). Tile ``first + tr *
    n_cols + tc`` holds canvas tile ``(tr, tc)``.
    """

    tile_grid: tuple[int, int]
    tile_size: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    scale: tuple[float, float] = (1.0, 1.0)
    first: int = 1


@dataclass(frozen=True)
class GridView:
    """One grid of an image's tokens, covering the whole picture.

    Attributes:
        offset: the view's first token, counted from the span's start.
        grid: ``(t, rows, cols)`` cells (a newline column is not counted).
        newline: every row of cells is followed by one newline token.
        name: what the view shows (``"base"``: the whole image at tile resolution,
            ``"tiles"``: the stitched high-resolution tiles).
        tile: the tile number of every cell when ``tiles`` is None (0: the overview).
        tiles: the `TileMap` of a stitched view.
    """

    offset: int
    grid: tuple[int, int, int]
    newline: bool = False
    name: str = "image"
    tile: int = 0
    tiles: TileMap | None = None

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * (w + int(self.newline))


@dataclass(frozen=True)
class ImageSpan:
    """One image's placeholder tokens.

    Attributes:
        image: index of the image among all images of the batch (feature order); for a
            video span, of the video among the videos.
        row: batch row.
        start, stop: token positions ``[start, stop)`` in the row.
        grid: ``(t, h, w)`` grid of LM tokens after merging. Without ``views``
            ``t*h*w == stop - start`` and token ``start + i`` is cell ``(i // (h*w),
            (i // w) % h, i % w)``, row-major; with ``views``, the grid of the first view.
        modality: ``"image"`` or ``"video"`` (``t`` is then the number of temporal patches).
        views: the grids of an image laid out as several (anyres); empty for one grid.
            Tokens in no view (a CLS token kept by ``vision_feature_select_strategy="full"``)
            have no cell.
    """

    image: int
    row: int
    start: int
    stop: int
    grid: tuple[int, int, int]
    modality: str = "image"
    views: tuple[GridView, ...] = ()

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start

    @property
    def grid_views(self) -> tuple[GridView, ...]:
        """The views, or the one plain view over ``grid``."""
        return self.views or (GridView(0, self.grid),)


@dataclass(frozen=True)
class ImageLayout:
    """The token layout of one image before it is placed: ``n_tokens`` placeholders whose
    cells are ``grid`` (or ``views``). `find_image_spans` accepts these or plain grids."""

    n_tokens: int
    grid: tuple[int, int, int]
    views: tuple[GridView, ...] = ()
    modality: str = "image"

    @classmethod
    def of(cls, item, modality: str = "image") -> "ImageLayout":
        if isinstance(item, ImageLayout):
            return item
        t, h, w = (int(v) for v in item)
        return cls(t * h * w, (t, h, w), modality=modality)


def span_cells(span: ImageSpan) -> dict[str, Tensor]:
    """Every token's cell: ``{"t", "tile", "row", "col"}`` long tensors ``[n_tokens]``
    (-1 for a token in no cell: a newline or a CLS token) and ``"newline"`` (bool).
    ``row``/``col`` are within the token's tile (the whole grid for a one-grid image)."""
    n = span.n_tokens
    out = {k: torch.full((n,), -1, dtype=torch.long) for k in ("t", "tile", "row", "col")}
    out["newline"] = torch.zeros(n, dtype=torch.bool)
    for v in span.grid_views:
        t, h, w = v.grid
        width = w + int(v.newline)
        i = torch.arange(v.n_tokens)
        tt, r, c = i // (h * width), (i // width) % h, i % width
        cell = c < w
        pos = v.offset + i
        out["newline"][pos[~cell]] = True
        pos, tt, r, c = pos[cell], tt[cell], r[cell], c[cell]
        out["t"][pos] = tt
        if v.tiles is None:
            out["tile"][pos], out["row"][pos], out["col"][pos] = v.tile, r, c
            continue
        m = v.tiles
        cy = m.crop[0] + ((r + 0.5) * m.scale[0]).floor().long() if m.scale[0] != 1.0 else m.crop[0] + r
        cx = m.crop[1] + ((c + 0.5) * m.scale[1]).floor().long() if m.scale[1] != 1.0 else m.crop[1] + c
        th, tw = m.tile_size
        out["tile"][pos] = m.first + (cy // th) * m.tile_grid[1] + cx // tw
        out["row"][pos], out["col"][pos] = cy % th, cx % tw
    return out


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def view_positions(span: ImageSpan, view: GridView) -> Int[Tensor, "t rows cols"]:
    """The token position of every cell of ``view`` (newline tokens left out), in the row
    of ``span``: ``[t, rows, cols]``, the view's own grid (not per tile)."""
    t, h, w = view.grid
    width = w + int(view.newline)
    idx = torch.arange(t * h * width).view(t, h, width)[..., :w]
    return span.start + view.offset + idx


def find_image_spans(
    input_ids: Int[Tensor, "batch pos"],
    image_token_id: int,
    grids: list[tuple[int, int, int] | ImageLayout],
    key_padding: Bool[Tensor, "batch pos"] | None = None,
    *,
    modality: str = "image",
) -> list[ImageSpan]:
    """Split the ``image_token_id`` runs of ``input_ids`` into one span per grid (or
    `ImageLayout`), in order.

    A run of adjacent image tokens may hold several images back to back; grids are
    consumed in order and must tile every run exactly. Raises ValueError naming the
    mismatch otherwise. ``modality`` names the spans (``"video"`` for video tokens).
    """
    layouts = [ImageLayout.of(g, modality) for g in grids]
    what = modality
    is_image = (input_ids == image_token_id).cpu()
    n_tokens = int(is_image.sum())
    expected = sum(lay.n_tokens for lay in layouts)
    if n_tokens != expected:
        shown = [lay.grid if not lay.views else f"{lay.n_tokens} tokens" for lay in layouts]
        raise ValueError(
            f"input_ids hold {n_tokens} {what} tokens (id {image_token_id}) but the "
            f"{len(layouts)} {what}(s) give {expected} features "
            f"(merged grids {shown}); the prompt and the {what}s do not match"
        )
    spans: list[ImageSpan] = []
    k = 0
    for row, flags in enumerate(is_image.tolist()):
        for start, stop in _runs(flags):
            pos = start
            while pos < stop:
                lay = layouts[k]
                n = lay.n_tokens
                if pos + n > stop:
                    raise ValueError(
                        f"{what} {k} (merged grid {lay.grid}, {n} tokens) does not fit the run of "
                        f"{stop - start} {what} tokens at row {row}, positions {start}..{stop - 1}"
                    )
                spans.append(ImageSpan(k, row, pos, pos + n, lay.grid, modality=lay.modality, views=lay.views))
                pos += n
                k += 1
    if key_padding is not None:
        pad = ~key_padding.cpu()
        for s in spans:
            if bool(pad[s.row, s.start:s.stop].any()):
                raise ValueError(f"attention_mask marks tokens of {s.modality} {s.image} (row {s.row}) as padding")
    return spans
