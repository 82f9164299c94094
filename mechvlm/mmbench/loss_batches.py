"""MMBench items as loss batches: the seed-000 prompt, the image, and the answer letter as
the target (for the visual-token analyses, which measure the answer's loss)."""

from __future__ import annotations

from collections.abc import Sequence

from mechvlm.mmbench.prompt import mmbench_prompt
from mechvlm.mmbench.tsv import MMBenchItem


def answer_loss_batches(builder, items: Sequence[MMBenchItem], batch_size: int = 8) -> list[tuple[dict, object]]:
    """``[(batch, target_mask)]``: each item's prompt and image with its answer letter (and
    the end of turn) as the model's reply (`InputBuilder.with_targets`), ``batch_size``
    items per batch. Items without an image or an answer are refused."""
    for it in items:
        if it.image is None or not it.answer:
            raise ValueError(f"MMBench item {it.index} has no image or no answer: it cannot be a loss example")
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out.append(builder.with_targets([mmbench_prompt(it) for it in chunk], [[it.pil_image()] for it in chunk],
                                        [it.answer for it in chunk]))
    return out
