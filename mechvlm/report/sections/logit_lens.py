"""Report section ``logit_lens``: the logit lens on the image tokens (seed 001; Neo et al.,
"Towards interpreting visual information processing in vision-language models")."""

from __future__ import annotations

from ...metrics import logit_lens
from . import AnalysisSection, ReportContext, register_analysis


def compute(ctx: ReportContext):
    return logit_lens(ctx.model, ctx.batches, positions="image", k=5, progress=ctx.progress)


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_logit_lens

    page.add_heading("Logit lens on the image tokens")
    page.add_text("Each cell: the most probable next token when the residual stream of an image "
                  "token at that layer is put through the final norm and the unembedding "
                  "(softmax over the whole vocabulary); colour = its probability. First example.")
    tok = getattr(ctx.builder, "tokenizer", None)
    page.add(fig_logit_lens(result, example=0, tokenizer=tok), alt="logit lens on the image tokens")


SECTION = register_analysis(AnalysisSection(
    name="logit_lens", title="Logit lens on the image tokens",
    description="top-k tokens of every layer's residual at the image positions",
    compute=compute, render=render))
