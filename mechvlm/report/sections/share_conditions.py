"""Report section ``share_conditions``: the text -> (image, EOI) attention share per layer
(image vs text on a model without EOI, as Fig. 1 of the report) under each of Table 1's
conditions the model can run (seed 000, Eq. 1-2 with the knockouts of Eq. 3-4), from
one prefill per batch (`attention_share_conditions`). A visible check that each knockout
removes what it says: the image bar vanishes under text->image, the EOI bar under text->EOI."""

from __future__ import annotations

from ...metrics import attention_share_conditions
from . import AnalysisSection, ReportContext, register_analysis


def compute(ctx: ReportContext):
    from ...mmbench.conditions import CONDITIONS
    from ..run import runnable_conditions, share_keys  # the report's own choices (a model without EOI)

    names, _ = runnable_conditions(ctx.model, list(CONDITIONS))
    return attention_share_conditions(ctx.model, ctx.batches, names, keys=share_keys(ctx.model),
                                      progress=ctx.progress, journal=ctx.journal_task("share_conditions"))


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_attention_share

    page.add_heading("Attention share under each condition")
    shared = sum(result.shared_batches.values())
    keys = " and to the ".join(next(iter(result.results.values())).keys)
    page.add_text(f"Per layer, the share of the text tokens' attention to the {keys} tokens "
                  "(per-head shares averaged over heads and examples), with no intervention and under each "
                  "knockout of Table 1. A knockout's own key role should vanish from its panel "
                  "(pre_softmax_mask renormalises over the other keys; post_softmax_zero removes the mass). "
                  f"{shared} of {result.n_batches * len(result.results)} batch x condition runs continued "
                  "one shared prefill per batch.")
    page.add(fig_attention_share(result.results), alt="attention share under each condition")


SECTION = register_analysis(AnalysisSection(
    name="share_conditions", title="Attention share under each condition",
    description="text -> (image, EOI) share per layer under none and the four knockouts, one prefill per batch",
    compute=compute, render=render))
