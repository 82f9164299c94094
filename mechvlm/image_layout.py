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
        cells: None when the span holds every cell of the grid (the usual case). For an
            image some of whose tokens were removed from the sequence (`HookedVLM.forward`
            ``image_cells``; one-grid images only), the row-major cell index of each
            token, increasing: token ``start + i`` is cell ``cells[i]``.
    """

    image: int
    row: int
    start: int
    stop: int
    grid: tuple[int, int, int]
    modality: str = "image"
    views: tuple[GridView, ...] = ()
    cells: tuple[int, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start

    @property
    def n_cells(self) -> int:
        """The number of vision feature vectors of the image: its grid's cells (``t*h*w``)
        for a one-grid image (also when ``cells`` keep only some), else its tokens."""
        if self.views:
            return self.n_tokens
        t, h, w = self.grid
        return t * h * w

    @property
    def cell_ids(self) -> tuple[int, ...]:
        """The row-major grid cell of each token of the span (one-grid images)."""
        return self.cells if self.cells is not None else tuple(range(self.n_tokens))

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
    ``row``/``col`` are within the token's tile (the whole grid for a one-grid image; for
    a span with ``cells``, the cells of the tokens that are left)."""
    n = span.n_tokens
    out = {k: torch.full((n,), -1, dtype=torch.long) for k in ("t", "tile", "row", "col")}
    out["newline"] = torch.zeros(n, dtype=torch.bool)
    for v in span.grid_views:
        t, h, w = v.grid
        width = w + int(v.newline)
        i = torch.arange(v.n_tokens) if span.cells is None else torch.tensor(span.cells, dtype=torch.long)
        tt, r, c = i // (h * width), (i // width) % h, i % width
        cell = c < w
        pos = v.offset + torch.arange(len(i))
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
    cells: list[tuple[int, ...]] | None = None,
) -> list[ImageSpan]:
    """Split the ``image_token_id`` runs of ``input_ids`` into one span per grid (or
    `ImageLayout`), in order.

    A run of adjacent image tokens may hold several images back to back; grids are
    consumed in order and must tile every run exactly. Raises ValueError naming the
    mismatch otherwise. ``modality`` names the spans (``"video"`` for video tokens).
    ``cells`` (see `check_image_cells`): per image, the grid cells its tokens stand for
    when some were removed; image ``k`` then has ``len(cells[k])`` tokens.
    """
    layouts = [ImageLayout.of(g, modality) for g in grids]
    what = modality
    is_image = (input_ids == image_token_id).cpu()
    n_tokens = int(is_image.sum())
    if cells is not None:
        if any(lay.views for lay in layouts):
            raise NotImplementedError(
                "image_cells (image tokens removed from the sequence) needs one-grid images; these "
                "images' tokens form several grids (anyres tiles, newline or CLS tokens)")
        cells = check_image_cells(cells, [lay.grid for lay in layouts])
    sizes = [lay.n_tokens for lay in layouts] if cells is None else [len(c) for c in cells]
    expected = sum(sizes)
    if n_tokens != expected:
        shown = [lay.grid if not lay.views else f"{lay.n_tokens} tokens" for lay in layouts]
        kept = "" if cells is None else f", of which image_cells keep {sizes}"
        raise ValueError(
            f"input_ids hold {n_tokens} {what} tokens (id {image_token_id}) but the "
            f"{len(layouts)} {what}(s) give {expected} features "
            f"(merged grids {shown}{kept}); the prompt and the {what}s do not match"
        )
    spans: list[ImageSpan] = []
    k = 0
    for row, flags in enumerate(is_image.tolist()):
        for start, stop in _runs(flags):
            pos = start
            while pos < stop:
                lay = layouts[k]
                n = sizes[k]
                if pos + n > stop:
                    raise ValueError(
                        f"{what} {k} (merged grid {lay.grid}, {n} tokens) does not fit the run of "
                        f"{stop - start} {what} tokens at row {row}, positions {start}..{stop - 1}"
                    )
                spans.append(ImageSpan(k, row, pos, pos + n, lay.grid, modality=lay.modality, views=lay.views,
                                       cells=None if cells is None else cells[k]))
                pos += n
                k += 1
    if key_padding is not None:
        pad = ~key_padding.cpu()
        for s in spans:
            if bool(pad[s.row, s.start:s.stop].any()):
                raise ValueError(f"attention_mask marks tokens of {s.modality} {s.image} (row {s.row}) as padding")
    return spans


def check_image_cells(cells, grids: list[tuple[int, int, int]]) -> list[tuple[int, ...]]:
    """Validate ``image_cells``: one entry per image (feature order), each a 1-D sequence
    of increasing, distinct row-major cell indices of that image's merged grid, at least one.
    Returns them as tuples of ints."""
    if isinstance(cells, Tensor) or not hasattr(cells, "__len__"):
        raise TypeError("image_cells must be a list with one sequence of cell indices per image")
    if len(cells) != len(grids):
        raise ValueError(f"image_cells has {len(cells)} entries but the batch has {len(grids)} image(s)")
    out = []
    for k, (c, (t, h, w)) in enumerate(zip(cells, grids)):
        ids = c.tolist() if isinstance(c, Tensor) else list(c)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"image_cells[{k}] must hold integer cell indices, got {ids[:4]}...")
        n = t * h * w
        if not ids:
            raise ValueError(f"image_cells[{k}] is empty: an image must keep at least one token "
                             "(mask its tokens as keys instead to drop all of them)")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"image_cells[{k}] must be strictly increasing (tokens in grid order), got {ids}")
        if ids[0] < 0 or ids[-1] >= n:
            raise ValueError(f"image_cells[{k}] has a cell outside the image's {t}x{h}x{w} = {n}-cell grid")
        out.append(tuple(ids))
    return out


def kept_feature_index(spans: list[ImageSpan], n_features: int) -> Int[Tensor, " kept"]:
    """Rows of the whole images' vision features ``[sum of n_cells, d]`` (feature order)
    that the tokens of ``spans`` take, in feature order."""
    ordered = sorted(spans, key=lambda s: s.image)
    total = sum(s.n_cells for s in ordered)
    if total != n_features:
        raise ValueError(f"the vision features hold {n_features} token vectors but the "
                         f"{len(ordered)} image(s) have {total} grid cells")
    index, offset = [], 0
    for s in ordered:
        index += [offset + c for c in s.cell_ids]
        offset += s.n_cells
    return torch.tensor(index, dtype=torch.long)


def check_one_grid_images(spans: list[ImageSpan], what: str, *, videos_allowed: bool = False) -> None:
    """Raise NotImplementedError naming why ``what`` (an analysis or intervention that
    removes or ranks image tokens by grid cell) cannot run on these spans: a video (its
    tokens are not images: ``image_cells`` index images only; ``videos_allowed``: the
    videos are left alone) or an image laid out as several grids (LLaVA-NeXT / OneVision
    anyres tiles and newline tokens, a kept CLS token)."""
    for s in spans:
        if s.modality != "image" and videos_allowed:
            continue
        if s.modality != "image":
            raise NotImplementedError(f"{what} handles images only; the batch holds a {s.modality} "
                                      f"(row {s.row}, positions {s.start}..{s.stop - 1})")
        if s.views:
            raise NotImplementedError(
                f"{what} needs one-grid images; image {s.image} (row {s.row}) is laid out as "
                f"{len(s.views)} views ({', '.join(v.name for v in s.views)}: anyres tiles, newline or CLS "
                "tokens), whose tokens cannot be removed as cells of one grid")
