"""Where each image sits in the token sequence, validated against the image grids.

An `ImageSpan` is one image's run of placeholder tokens. Spans are listed in the order
the vision features arrive (batch row by row, left to right), which is the order of
``image_grid_thw`` and of HF's ``masked_scatter``. Token roles, mRoPE positions and
heatmaps over the image all read the spans instead of re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor


@dataclass(frozen=True)
class ImageSpan:
    """One image's placeholder tokens.

    Attributes:
        image: index of the image among all images of the batch (feature order).
        row: batch row.
        start, stop: token positions ``[start, stop)`` in the row.
        grid: ``(t, h, w)`` grid of LM tokens after merging (``t*h*w == stop - start``);
            token ``start + i`` is cell ``(i // (h*w), (i // w) % h, i % w)``, row-major.
        cells: None when the span holds every cell of the grid (the usual case). For an
            image some of whose tokens were removed from the sequence (`HookedVLM.forward`
            ``image_cells``), the row-major cell index of each token, increasing:
            token ``start + i`` is cell ``cells[i]``.
    """

    image: int
    row: int
    start: int
    stop: int
    grid: tuple[int, int, int]
    cells: tuple[int, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start

    @property
    def n_cells(self) -> int:
        """The number of cells of the grid (``t*h*w``): the image's vision features."""
        t, h, w = self.grid
        return t * h * w

    @property
    def cell_ids(self) -> tuple[int, ...]:
        """The row-major grid cell of each token of the span."""
        return self.cells if self.cells is not None else tuple(range(self.n_tokens))


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def find_image_spans(
    input_ids: Int[Tensor, "batch pos"],
    image_token_id: int,
    grids: list[tuple[int, int, int]],
    key_padding: Bool[Tensor, "batch pos"] | None = None,
    cells: list[tuple[int, ...]] | None = None,
) -> list[ImageSpan]:
    """Split the image-token runs of ``input_ids`` into one span per grid, in order.

    A run of adjacent image tokens may hold several images back to back; grids are
    consumed in order and must tile every run exactly. Raises ValueError naming the
    mismatch otherwise. ``cells`` (see `check_image_cells`): per image, the grid cells its
    tokens stand for when some were removed; image ``k`` then has ``len(cells[k])`` tokens.
    """
    is_image = (input_ids == image_token_id).cpu()
    n_tokens = int(is_image.sum())
    if cells is not None:
        cells = check_image_cells(cells, grids)
    sizes = [t * h * w for t, h, w in grids] if cells is None else [len(c) for c in cells]
    expected = sum(sizes)
    if n_tokens != expected:
        kept = "" if cells is None else f", of which image_cells keep {sizes}"
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but the "
            f"{len(grids)} image(s) give {expected} features "
            f"(merged grids {grids}{kept}); the prompt and the images do not match"
        )
    spans: list[ImageSpan] = []
    k = 0
    for row, flags in enumerate(is_image.tolist()):
        for start, stop in _runs(flags):
            pos = start
            while pos < stop:
                t, h, w = grids[k]
                n = sizes[k]
                if pos + n > stop:
                    raise ValueError(
                        f"image {k} (merged grid {(t, h, w)}, {n} tokens) does not fit the run of "
                        f"{stop - start} image tokens at row {row}, positions {start}..{stop - 1}"
                    )
                spans.append(ImageSpan(k, row, pos, pos + n, (t, h, w), None if cells is None else cells[k]))
                pos += n
                k += 1
    if key_padding is not None:
        pad = ~key_padding.cpu()
        for s in spans:
            if bool(pad[s.row, s.start:s.stop].any()):
                raise ValueError(f"attention_mask marks tokens of image {s.image} (row {s.row}) as padding")
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
