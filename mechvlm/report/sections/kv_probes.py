"""Report section ``kv_probes``: zero-shot probes of the image keys and values (seed 002),
with the text-prefix control.

The probes need ground truth, so they run on scenes of `mechvlm.toy` (their masks, moved
objects and colour names are known) for any model: 32 segmentation images, 16
correspondence pairs and 32 referring scenes, without and with a text prefix before the
image."""

from __future__ import annotations

from dataclasses import dataclass

from . import AnalysisSection, ReportContext, register_analysis

PREFIX = "Look at the image carefully."
#: toy samples per probe: segmentation images, correspondence pairs, referring scenes
SIZES = (32, 16, 32)


@dataclass
class KVProbeSection:
    no_prefix: object
    prefix: object

    def to_dict(self) -> dict:
        return {"no_prefix": self.no_prefix.to_dict(), "prefix": self.prefix.to_dict(), "text_prefix": PREFIX}


def compute(ctx: ReportContext) -> KVProbeSection:
    from ...analyses.probe_data import toy_correspondence, toy_referring, toy_segmentation
    from ...analyses.probes import text_prefix_control

    n_seg, n_corr, n_ref = SIZES
    out = text_prefix_control(ctx.model, ctx.builder, PREFIX, segmentation=toy_segmentation(n_seg, 0),
                              correspondence=toy_correspondence(n_corr, 1), referring=toy_referring(n_ref, 2),
                              method="linear", batch_size=ctx.batch_size, progress=ctx.progress)
    return KVProbeSection(out["no_prefix"], out["prefix"])


def render(result: KVProbeSection, page, ctx: ReportContext) -> None:
    from ...viz import fig_probe_scores
    from ..tables import html_table

    page.add_heading("Zero-shot probes of the image keys and values (seed 002)")
    page.add_text("Segmentation: a linear probe on the token features, mIoU object vs background on held-out "
                  "images (chance: the same probe on tokens shuffled within each image). Correspondence: "
                  "nearest-neighbour matching of the moved object's cells, PCK (chance 1/cells). Referring: "
                  "the colour option's query against the image keys (value: cosine of values), hit rate in "
                  "the named shape's box (chance: the box's share of the grid). Toy scenes; the vision row is "
                  "the vision encoder's output.")
    page.add(fig_probe_scores(result.no_prefix), alt="probe scores per layer")
    rows = []
    for task in ("segmentation", "correspondence", "referring"):
        a, b = result.no_prefix.best(task), result.prefix.best(task)
        rows.append([task, f"{a['kind']} L{a['layer']}", f"{a['score']:.3f}", f"{b['score']:.3f}",
                     f"{a['chance']:.3f}"])
    page.add_html(html_table("kv_probes_prefix", ["task", "best (no prefix)", "score", f"with prefix {PREFIX!r}", "chance"], rows,
                         "text-prefix control: the best language-model row without and with the prefix"))


SECTION = register_analysis(AnalysisSection(
    name="kv_probes", title="Zero-shot probes of the image keys and values",
    description="segmentation / correspondence / referring probes per layer, K vs V, vision baseline, "
                "text-prefix control", compute=compute, render=render))
