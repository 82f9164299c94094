"""Report section ``causal_tracing``: restoring the residual stream and each head from the
clean run into a run with noised image embeddings (ROME's 3 std), on the first ``N_ITEMS``
items; the target is the model's clean prediction."""

from __future__ import annotations

from . import AnalysisSection, ReportContext, register_analysis

N_ITEMS = 8


def compute(ctx: ReportContext):
    from ...analyses.causal_tracing import causal_trace
    from ..run import metric_batches

    batches = list(metric_batches(ctx.builder, ctx.items[:N_ITEMS], ctx.batch_size))
    return causal_trace(ctx.model, batches, heads=True, progress=ctx.progress)


def render(result, page, ctx: ReportContext) -> None:
    from ...viz import fig_causal_trace

    page.add_heading("Causal tracing (METHODS §13)")
    page.add_text(f"Corrupted run: Gaussian noise of 3 std on the image embeddings. Each cell: recovery of the "
                  f"predicted token's probability when that site is restored from the clean run, "
                  f"(p - p_corrupt) / (p_clean - p_corrupt); {len(result.p_clean)} items, {result.n_forwards} "
                  f"forwards, {result.wall_s:.1f} s.")
    page.add(fig_causal_trace(result), alt="causal tracing heatmaps")


SECTION = register_analysis(AnalysisSection(
    name="causal_tracing", title="Causal tracing",
    description="layer x position-group and layer x head restoration maps under image-embedding noise",
    compute=compute, render=render))
