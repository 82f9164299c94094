"""Synthetic visual questions: shapes on a grey canvas, with a multiple-choice question.

One `Scene` is an image plus a question of one category (color, shape, position, count),
its candidate answers and the right one. The same scenes feed the shipped MMBench-format
benchmark (`mechvlm.toy.benchmark`) and the toy models' training (`mechvlm.toy.train`), so
the words that can appear are fixed here (`ALL_WORDS`): the toy tokenizer is built from
them. Everything is deterministic given a seed.

The images are 112x112: 8x8 patches of 14 px, i.e. 16 image tokens after Qwen2.5-VL's 2x2
merge and 16 pooled tokens for the toy Gemma3 (a 4x4 grid of 28 px cells).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

IMAGE_SIZE = 112
CELL = 28  # one image token covers a CELL x CELL square
GRID = IMAGE_SIZE // CELL

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("one", "two", "three", "four")
SIZES = {"tiny": (7, 9), "small": (12, 14), "medium": (18, 20), "large": (26, 29)}  # half-size px

QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "Which shape is shown in the image?",
    "position": "Where is the shape in the image?",
    "count": "How many shapes are in the image?",
    "size": "How big is the shape?",
}
# The shipped benchmark and toy models use these four. "shape" stays available but is not
# in the default set: the ~1M-parameter toys did not get above chance on it within the CPU
# training budget (the prototype in docs/toy_models.md saw the same), while "size" is learnable.
CATEGORIES = ("color", "size", "position", "count")
ALL_CATEGORIES = tuple(QUESTIONS)
L2_CATEGORY = {"color": "attribute_recognition", "shape": "object_recognition",
               "position": "spatial_relation", "count": "object_counting",
               "size": "attribute_recognition"}
HINTS = ("Look at the image carefully.", "The background is grey.")
VALUES = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS, "count": COUNTS,
          "size": tuple(SIZES)}
OPEN_INSTRUCTION = "Answer the question using a single word."

BACKGROUND = 128


@dataclasses.dataclass
class Scene:
    """An image and a question about it. ``options`` are the candidate answers in a
    canonical order; ``answer`` is one of them."""

    image: np.ndarray  # uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
    category: str
    question: str
    options: list[str]
    answer: str
    hint: str | None = None
    #: one bool ``[IMAGE_SIZE, IMAGE_SIZE]`` pixel mask per painted shape (the ground truth
    #: of where the objects are; several for ``count`` scenes)
    object_masks: list[np.ndarray] = dataclasses.field(default_factory=list, repr=False)

    def pil_image(self):
        from PIL import Image

        return Image.fromarray(self.image)

    @property
    def object_mask(self) -> np.ndarray:
        """bool ``[IMAGE_SIZE, IMAGE_SIZE]``: pixels covered by any object."""
        out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for m in self.object_masks:
            out |= m
        return out

    def token_coverage(self, grid: int = GRID) -> np.ndarray:
        """float ``[grid, grid]``: the fraction of each image-token cell covered by an object.

        Cell ``(r, c)`` is the square of side ``IMAGE_SIZE / grid`` at row ``r``, column ``c``;
        with the default ``grid`` it is exactly one LM image token of both shipped toys
        (Qwen2.5-VL: a merged 2x2 patch block of 28 px; Gemma3: a pooled 28 px cell), in the
        row-major order of `TokenRoles.grid_row` / ``grid_col``.
        """
        if IMAGE_SIZE % grid:
            raise ValueError(f"grid {grid} does not divide the image size {IMAGE_SIZE}")
        side = IMAGE_SIZE // grid
        return self.object_mask.reshape(grid, side, grid, side).mean(axis=(1, 3))

    def token_mask(self, grid: int = GRID, threshold: float = 0.5) -> np.ndarray:
        """bool ``[grid, grid]``: cells at least ``threshold`` covered (see `token_coverage`);
        ``threshold=0`` marks every cell an object touches."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        cov = self.token_coverage(grid)
        return cov > 0 if threshold == 0 else cov >= threshold


def _canvas(rng: np.random.Generator) -> np.ndarray:
    """A flat grey canvas (flat so the shipped PNGs stay small)."""
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.float64)


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean [H, W] mask of a shape of half-size ``r`` centred at (cx, cy)."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _paint(img: np.ndarray, mask: np.ndarray, color: str, masks: list[np.ndarray]) -> None:
    img[mask] = COLORS[color]
    masks.append(mask)


def make_scene(category: str, rng: np.random.Generator, *, hint_prob: float = 0.25) -> Scene:
    """Draw a random scene of ``category``; its question has four candidate answers."""
    py = random.Random(int(rng.integers(2 ** 31)))
    img = _canvas(rng)
    masks: list[np.ndarray] = []
    shape = py.choice(SHAPES)
    color = py.choice(list(COLORS))
    if category in ("color", "shape"):
        r = py.uniform(22, 30)
        cx, cy = py.uniform(r + 4, IMAGE_SIZE - r - 4), py.uniform(r + 4, IMAGE_SIZE - r - 4)
        _paint(img, _shape_mask(shape, cx, cy, r), color, masks)
        if category == "color":
            others = [c for c in COLORS if c != color]
            options, answer = [color] + py.sample(others, 3), color
        else:
            options, answer = list(SHAPES), shape
    elif category == "size":
        size = py.choice(list(SIZES))
        r = py.uniform(*SIZES[size])
        shape = py.choice(("circle", "square"))  # compact shapes: area follows the size
        cx, cy = py.uniform(r + 2, IMAGE_SIZE - r - 2), py.uniform(r + 2, IMAGE_SIZE - r - 2)
        _paint(img, _shape_mask(shape, cx, cy, r), color, masks)
        options, answer = list(SIZES), size
    elif category == "position":
        q = py.randrange(4)
        half = IMAGE_SIZE / 2
        r = py.uniform(14, 20)
        cx = (q % 2) * half + py.uniform(r + 2, half - r - 2)
        cy = (q // 2) * half + py.uniform(r + 2, half - r - 2)
        _paint(img, _shape_mask(shape, cx, cy, r), color, masks)
        options, answer = list(POSITIONS), POSITIONS[q]
    elif category == "count":
        n = py.randint(1, 4)
        for cell in py.sample(range(GRID * GRID), n):  # one shape per token cell
            cx = (cell % GRID + 0.5) * CELL + py.uniform(-2, 2)
            cy = (cell // GRID + 0.5) * CELL + py.uniform(-2, 2)
            _paint(img, _shape_mask(shape, cx, cy, py.uniform(9, 12)), color, masks)
        options, answer = list(COUNTS), COUNTS[n - 1]
    else:
        raise ValueError(f"unknown category {category!r}; known: {ALL_CATEGORIES}")
    hint = py.choice(HINTS) if py.random() < hint_prob else None
    return Scene(img.astype(np.uint8), category, QUESTIONS[category], options, answer, hint, masks)


def make_scenes(n: int, seed: int, categories=CATEGORIES, **kw) -> list[Scene]:
    """``n`` scenes cycling through ``categories``, deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_scene(categories[i % len(categories)], rng, **kw) for i in range(n)]


LETTERS = ("A", "B", "C", "D")


def option_line(letter: str, text: str) -> str:
    return f"{letter}. {text}"


def sentence_lines() -> list[str]:
    """The fixed sentences of the prompts (questions, hints, instructions)."""
    return [*QUESTIONS.values(), *HINTS, OPEN_INSTRUCTION,
            "Answer with the option's letter from the given choices directly."]


def all_words() -> list[str]:
    """Every text line/word a prompt about a scene can contain (for the toy vocabulary)."""
    texts = sentence_lines()
    values = sorted({v for vs in VALUES.values() for v in vs})
    lines = [option_line(letter, v) for letter in LETTERS for v in values]
    return texts + values + list(LETTERS) + lines
