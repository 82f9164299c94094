"""Scenes with a known answer for the probes of seed 002 (segmentation, correspondence,
referring-expression localisation) on the toys' 4x4 token grid.

* `segmentation_scenes`: one large shape per image; ground truth ``Scene.token_mask()``.
* `moved_pair`: the same shape (colour, form, size) painted twice, moved by a whole number
  of token cells between the two images, so token cell ``(r, c)`` of the object in the
  first image corresponds exactly to cell ``(r + dr, c + dc)`` in the second.
* `referring_scene`: two shapes of different colours in different quadrants, with the
  seed-000 colour question whose options name both colours; the option-line token of one
  colour (``"B. red"``, one token of the toy tokenizer) refers to that shape.

Everything is deterministic given the numpy generator.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from .scenes import (CELL, COLORS, GRID, IMAGE_SIZE, LETTERS, QUESTIONS, SHAPES, Scene, _canvas, _paint,
                     _shape_mask, make_scene, option_line)


def segmentation_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` colour-question scenes (one shape of half-size 22-30 px, covering several cells)."""
    rng = np.random.default_rng(seed)
    return [make_scene("color", rng, hint_prob=0.0) for _ in range(n)]


@dataclasses.dataclass
class MovedPair:
    """Two scenes with the same object, moved by ``shift = (dr, dc)`` token cells.

    ``cells_a`` / ``cells_b``: ``[K, 2]`` (row, col) of corresponding object cells (the cells
    the object covers at least half of in ``a``, and the same cells shifted in ``b``).
    """

    a: Scene
    b: Scene
    shift: tuple[int, int]
    cells_a: np.ndarray
    cells_b: np.ndarray

    def points(self, which: str) -> np.ndarray:
        """``[K, 2]`` (x, y) pixel centres of the corresponding cells in image ``which``."""
        cells = self.cells_a if which == "a" else self.cells_b
        return (cells[:, ::-1] + 0.5) * CELL


def _scene(img, masks, color) -> Scene:
    question = QUESTIONS["color"]
    others = [c for c in COLORS if c != color]
    return Scene(img.astype(np.uint8), "color", question, [color] + others[:3], color, None, masks)


def moved_pair(rng: np.random.Generator) -> MovedPair:
    """A random object (half-size 16-24 px) and a shift of at least one cell that keeps it
    inside the image."""
    py = random.Random(int(rng.integers(2 ** 31)))
    shape, color = py.choice(SHAPES[:2]), py.choice(list(COLORS))  # compact shapes: circle, square
    r = py.uniform(16, 24)
    while True:
        cx, cy = py.uniform(r + 2, IMAGE_SIZE - r - 2), py.uniform(r + 2, IMAGE_SIZE - r - 2)
        dr, dc = py.randint(-GRID + 1, GRID - 1), py.randint(-GRID + 1, GRID - 1)
        bx, by = cx + dc * CELL, cy + dr * CELL
        if (dr, dc) != (0, 0) and r + 2 <= bx <= IMAGE_SIZE - r - 2 and r + 2 <= by <= IMAGE_SIZE - r - 2:
            break
    scenes = []
    for x, y in ((cx, cy), (bx, by)):
        img, masks = _canvas(rng), []
        _paint(img, _shape_mask(shape, x, y, r), color, masks)
        scenes.append(_scene(img, masks, color))
    cells = np.argwhere(scenes[0].token_mask())
    cells = cells[(cells[:, 0] + dr >= 0) & (cells[:, 0] + dr < GRID) & (cells[:, 1] + dc >= 0)
                  & (cells[:, 1] + dc < GRID)]
    return MovedPair(scenes[0], scenes[1], (dr, dc), cells, cells + np.array([dr, dc]))


def moved_pairs(n: int, seed: int) -> list[MovedPair]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = moved_pair(rng)
        if len(p.cells_a):
            out.append(p)
    return out


@dataclasses.dataclass
class ReferringScene:
    """Two shapes of different colours; ``prompt`` is the colour question with four options,
    two of them the shapes' colours. ``query_token`` (the option line of ``target``'s
    colour) refers to the shape whose pixel mask is ``target_mask``."""

    scene: Scene
    prompt: str
    query_token: str
    target: str
    target_mask: np.ndarray


def referring_scene(rng: np.random.Generator) -> ReferringScene:
    from ..mmbench.prompt import mmbench_prompt_text

    py = random.Random(int(rng.integers(2 ** 31)))
    c1, c2 = py.sample(list(COLORS), 2)
    q1, q2 = py.sample(range(4), 2)  # quadrants
    img, masks = _canvas(rng), []
    half = IMAGE_SIZE / 2
    for color, q in ((c1, q1), (c2, q2)):
        r = py.uniform(16, 22)
        cx = (q % 2) * half + py.uniform(r + 2, half - r - 2)
        cy = (q // 2) * half + py.uniform(r + 2, half - r - 2)
        _paint(img, _shape_mask(py.choice(SHAPES[:2]), cx, cy, r), color, masks)
    scene = _scene(img, masks, c1)
    options = [c1, c2] + py.sample([c for c in COLORS if c not in (c1, c2)], 2)
    py.shuffle(options)
    prompt = mmbench_prompt_text(scene.question, dict(zip(LETTERS, options)))
    target = py.choice((0, 1))
    color = (c1, c2)[target]
    token = option_line(LETTERS[options.index(color)], color)
    return ReferringScene(scene, prompt, token, color, masks[target])


def referring_scenes(n: int, seed: int) -> list[ReferringScene]:
    rng = np.random.default_rng(seed)
    return [referring_scene(rng) for _ in range(n)]
