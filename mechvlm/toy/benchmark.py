"""The synthetic benchmark in the real MMBench TSV format.

``mechvlm make-mmbench --out FILE`` (or `write_benchmark`) writes base questions from
`mechvlm.toy.scenes` and, as MMBench's circular evaluation does, copies whose options are
rotated: copy k of base question ``i`` has index ``i + k * 1_000_000`` and its ``image``
field holds ``i`` (a reference to the base row's image, as the real file does). Correct
letters are balanced: base question ``i`` has its answer at letter ``i // 4 % 4`` and each
rotation moves it by one. About a quarter of the questions carry a hint.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

import numpy as np

from .scenes import CATEGORIES, L2_CATEGORY, LETTERS, make_scene

SHIPPED_TSV = Path(__file__).resolve().parent.parent / "assets" / "mmbench_toy.tsv"
CIRCULAR_OFFSET = 1_000_000


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def benchmark_rows(n_questions: int, seed: int, *, circular: bool = True) -> list[dict]:
    """MMBench rows (dicts keyed by the TSV columns): ``n_questions`` base questions cycling
    through the categories, each followed (if ``circular``) by its rotated copies."""
    rng = np.random.default_rng(seed)
    py = random.Random(seed)
    rows = []
    for i in range(n_questions):
        category = CATEGORIES[i % len(CATEGORIES)]
        scene = make_scene(category, rng)
        others = [o for o in scene.options if o != scene.answer]
        py.shuffle(others)
        at = (i // len(CATEGORIES)) % len(LETTERS)
        options = others[:at] + [scene.answer] + others[at:]
        base = dict(question=scene.question, hint=scene.hint or "", category=category,
                    source="mechvlm-synthetic", **{"l2-category": L2_CATEGORY[category]},
                    comment="", split="dev")
        for k in range(len(options) if circular else 1):
            rotated = options[k:] + options[:k]
            rows.append(dict(
                base, index=i + k * CIRCULAR_OFFSET,
                answer=LETTERS[rotated.index(scene.answer)],
                image=png_base64(scene.image) if k == 0 else str(i),
                **dict(zip(LETTERS, rotated))))
    return rows


def write_benchmark(out: str | Path, n_questions: int = 100, seed: int = 2026, *,
                    circular: bool = True) -> Path:
    """Write the TSV (atomically: a temporary file renamed into place); returns its path."""
    from ..mmbench.tsv import write_mmbench

    if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be a positive integer, got {n_questions!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mmbench(benchmark_rows(n_questions, seed, circular=circular), out)
    return out
