"""Report section ``token_categories``: sink / dead / alive image tokens by the model-agnostic
criterion (massive activations, near-zero or pad-nearest inputs; seed 003, METHODS §10-11)."""

from __future__ import annotations

from ...analyses import massive_activation_categories
from . import AnalysisSection, ReportContext, register_analysis
from .token_contribution import first_images


def compute(ctx: ReportContext):
    try:
        return massive_activation_categories(ctx.model, ctx.batches, progress=ctx.progress)
    except ValueError as e:  # e.g. a d_model too small for the threshold: dead / alive only
        res = massive_activation_categories(ctx.model, ctx.batches, sink_dims=[], progress=ctx.progress)
        res.settings["sinks_not_evaluated"] = str(e)
        return res


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_category_fractions, fig_token_categories

    items = list(ctx.items)
    page.add_heading("Sink / dead / alive visual tokens")
    fr = result.fractions.mean(0).tolist()
    note = result.settings.get("sinks_not_evaluated")
    page.add_text(f"Mean over {len(result.category)} images: alive {fr[0]:.1%}, sink {fr[1]:.1%}, dead {fr[2]:.1%}. "
                  f"Sink: r = |h|/rms(h) > {result.settings['threshold']} on the dimensions "
                  f"{result.settings['sink_dims']} (massive on the BOS-like token) from layer "
                  f"{result.settings['first_layer']} on; dead: norm <= {result.settings['dead_norm']} x the median "
                  f"text-embedding norm, or nearest to the rows {result.settings['dead_ids']}."
                  + (f" Sinks not evaluated: {note}" if note else ""))
    page.add(fig_category_fractions(result), alt="category fractions")
    shown, images = first_images(items, result.example)
    page.add(fig_token_categories(result, images, which=shown, cfg=ctx.model.cfg), alt="token categories on the image")


SECTION = register_analysis(AnalysisSection(
    name="token_categories", title="Sink / dead / alive visual tokens",
    description="massive-activation sinks, near-zero / pad-nearest dead tokens, per image and layer",
    compute=compute, render=render))
