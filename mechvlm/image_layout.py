"""Where each image sits in the token sequence, validated against the image grids.

An `ImageSpan` is one image's run of placeholder tokens. Spans are listed in the order
the vision features arrive (batch row by row, left to right), which is the order of
``image_grid_thw`` and of HF's ``masked_scatter``. Token roles, mRoPE positions and
heatmaps over the image all read the spans instead of re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    image: int
    row: int
    start: int
    stop: int
    grid: tuple[int, int, int]

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start


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
) -> list[ImageSpan]:
    """Split the image-token runs of ``input_ids`` into one span per grid, in order.

    A run of adjacent image tokens may hold several images back to back; grids are
    consumed in order and must tile every run exactly. Raises ValueError naming the
    mismatch otherwise.
    """
    is_image = (input_ids == image_token_id).cpu()
    n_tokens = int(is_image.sum())
    expected = sum(t * h * w for t, h, w in grids)
    if n_tokens != expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but the "
            f"{len(grids)} image(s) give {expected} features "
            f"(merged grids {grids}); the prompt and the images do not match"
        )
    spans: list[ImageSpan] = []
    k = 0
    for row, flags in enumerate(is_image.tolist()):
        for start, stop in _runs(flags):
            pos = start
            while pos < stop:
                t, h, w = grids[k]
                n = t * h * w
                if pos + n > stop:
                    raise ValueError(
                        f"image {k} (merged grid {(t, h, w)}, {n} tokens) does not fit the run of "
                        f"{stop - start} image tokens at row {row}, positions {start}..{stop - 1}"
                    )
                spans.append(ImageSpan(k, row, pos, pos + n, (t, h, w)))
                pos += n
                k += 1
    if key_padding is not None:
        pad = ~key_padding.cpu()
        for s in spans:
            if bool(pad[s.row, s.start:s.stop].any()):
                raise ValueError(f"attention_mask marks tokens of image {s.image} (row {s.row}) as padding")
    return spans
