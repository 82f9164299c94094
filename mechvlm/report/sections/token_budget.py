"""Report section ``token_budget``: answer loss vs the fraction of image tokens kept, four
keep strategies, tokens removed from the sequence (seed 001; METHODS §8)."""

from __future__ import annotations

from ...analyses import token_budget
from ...mmbench.loss_batches import answer_loss_batches
from . import AnalysisSection, ReportContext, register_analysis

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)


def compute(ctx: ReportContext):
    batches = answer_loss_batches(ctx.builder, list(ctx.items), ctx.batch_size)
    return token_budget(ctx.model, batches, fractions=FRACTIONS, draws=3, mode="removed", progress=ctx.progress,
                        journal=ctx.journal_task("token_budget"))


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_token_budget

    page.add_heading("Visual-token budget vs loss")
    page.add_text("Each image keeps a fraction of its tokens (first in raster order, random with three draws, "
                  "most attended by the prompt text, or evenly spaced on the grid); the others are removed "
                  "from the sequence (positions as the model assigns them). The loss is the cross-entropy "
                  f"of the answer letter and end of turn, averaged over the {len(result.full_loss)} items "
                  f"({result.n_forwards} forwards).")
    page.add(fig_token_budget(result), alt="loss vs fraction of image tokens kept")


SECTION = register_analysis(AnalysisSection(
    name="token_budget", title="Visual-token budget vs loss",
    description="answer loss with a fraction of the image tokens kept, per keep strategy",
    compute=compute, render=render))
