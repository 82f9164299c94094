"""Report section ``token_contribution``: the loss increase when one image token is removed,
on the image, for the first items (seed 001)."""

from __future__ import annotations

from ...analyses import token_contribution
from ...mmbench.loss_batches import answer_loss_batches
from . import AnalysisSection, ReportContext, register_analysis

N_ITEMS = 4  # each item costs (image tokens + 1) / batch_size forwards


def compute(ctx: ReportContext):
    batches = answer_loss_batches(ctx.builder, list(ctx.items)[:N_ITEMS], ctx.batch_size)
    return token_contribution(ctx.model, batches, unit="token", mode="removed", batch_size=ctx.batch_size,
                              progress=ctx.progress, journal=ctx.journal_task("token_contribution"))


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_contribution

    items = list(ctx.items)
    page.add_heading("Per-token contribution")
    page.add_text(f"Loss increase of the answer when one image token is removed from the sequence (first "
                  f"{len(result.base_loss)} items; {result.n_forwards} forwards of {result.batch_size} rows).")
    shown, images = first_images(items, result.example)
    page.add(fig_contribution(result, images, which=shown, cfg=ctx.model.cfg), alt="per-token contribution")


def first_images(items, example, n: int = 3) -> tuple[list[int], list]:
    """The first ``n`` image entries of a per-image result and the pictures of their items."""
    shown = list(range(min(n, len(example))))
    return shown, [items[int(example[i])].pil_image() for i in shown]


SECTION = register_analysis(AnalysisSection(
    name="token_contribution", title="Per-token contribution",
    description="loss increase when one image token is removed, on the image",
    compute=compute, render=render))
