"""Report section ``head_attribution``: the heads that carry the image to the answer (seed
004), by random joint ablation of the image keys/values and a ridge fit, on the first
``N_ITEMS`` items; the target is the model's clean prediction."""

from __future__ import annotations

from dataclasses import dataclass

from . import AnalysisSection, ReportContext, register_analysis

N_ITEMS = 16
N_MASKS = 128
TOP_K = 2


@dataclass
class HeadAttributionSection:
    attribution: object
    top_vs_random: dict

    def to_dict(self) -> dict:
        return {"attribution": self.attribution.to_dict(), "top_vs_random": self.top_vs_random}


def compute(ctx: ReportContext) -> HeadAttributionSection:
    from ...analyses.head_attribution import head_attribution, top_vs_random_heads
    from ..run import metric_batches

    batches = list(metric_batches(ctx.builder, ctx.items[:N_ITEMS], ctx.batch_size))
    res = head_attribution(ctx.model, batches, n_masks=N_MASKS, ablate_prob=0.25, masks_per_forward=16,
                           progress=ctx.progress, journal=ctx.journal_task("head_attribution"))
    k = min(TOP_K, res.weights.numel())
    return HeadAttributionSection(res, top_vs_random_heads(ctx.model, batches, res, res.targets, k, n_random=5))


def render(result: HeadAttributionSection, page, ctx: ReportContext) -> None:
    from ...viz import fig_head_attribution
    from ..tables import html_table

    res, tv = result.attribution, result.top_vs_random
    page.add_heading("Head attribution (seed 004)")
    page.add_text(f"{res.masks.shape[0]} random joint ablations (each head's image keys/values replaced by "
                  f"their mean with probability {res.settings['ablate_prob']}) on {res.settings['n_examples']} "
                  f"items; ridge fit of the drop of the predicted token's logit, held-out R² {res.r2_test:.2f}; "
                  f"{res.n_forwards} forwards, {res.wall_s:.1f} s.")
    page.add(fig_head_attribution(res), alt="head attribution heatmaps")
    page.add_html(html_table("head_attribution_top_vs_random", ["heads ablated", "agreement with the clean prediction"],
                         [["none", f"{tv['clean']:.3f}"], [f"top {tv['k']}: {tv['top_heads']}", f"{tv['top']:.3f}"],
                          [f"{tv['k']} random (mean of {len(tv['random'])})", f"{tv['random_mean']:.3f}"]],
                         "top-attributed heads vs random heads"))


SECTION = register_analysis(AnalysisSection(
    name="head_attribution", title="Head attribution",
    description="random joint ablations of image K/V + ridge regression; single-head and attention comparison",
    compute=compute, render=render))
