"""Report section ``key_artifacts``: input-agnostic image keys (seed 002) over the report's
images, and what replacing them with their mean does to the answer distribution."""

from __future__ import annotations

from dataclasses import dataclass

from . import AnalysisSection, ReportContext, register_analysis

THRESHOLD = 0.9


@dataclass
class KeyArtifactSection:
    artifacts: object
    replacement: dict

    def to_dict(self) -> dict:
        return {"artifacts": self.artifacts.to_dict(), "replacement": self.replacement}


def compute(ctx: ReportContext) -> KeyArtifactSection:
    from ...analyses.image_kv import image_kv
    from ...analyses.key_artifacts import key_artifacts, replace_artifact_keys

    kv = image_kv(ctx.model, ctx.batches, kinds=("key", "value"), vision=False, progress=ctx.progress)
    art = key_artifacts(kv, threshold=THRESHOLD)
    return KeyArtifactSection(art, replace_artifact_keys(ctx.model, ctx.batches, art, progress=ctx.progress))


def render(result: KeyArtifactSection, page, ctx: ReportContext) -> None:
    from ...viz import fig_key_artifacts
    from ..tables import html_table

    page.add_heading("Input-agnostic image keys (seed 002)")
    page.add_text(f"Mean cosine of each image key (layer, grid cell, KV head) over all pairs of the "
                  f"{result.artifacts.n_images} report images; boxed: >= {THRESHOLD}. Replacing those keys "
                  "with their mean vs as many random keys: KL of the next-token distribution at the last position.")
    page.add(fig_key_artifacts(result.artifacts), alt="key consistency across images")
    r = result.replacement
    page.add_html(html_table("key_artifacts_replacement", ["keys replaced", "n keys per layer", "mean KL", "mean change of p(top-1)"],
                         [["artifacts", str(r["n_keys"]), f"{r['artifacts']['kl']:.2e}",
                           f"{r['artifacts']['dp_top1']:+.2e}"],
                          ["random (mean)", str(r["n_keys"]), f"{r['random_mean']['kl']:.2e}",
                           f"{r['random_mean']['dp_top1']:+.2e}"]], "replacing keys with their mean"))


SECTION = register_analysis(AnalysisSection(
    name="key_artifacts", title="Input-agnostic image keys",
    description="cross-image key cosine per layer / cell / head and the effect of mean-replacing the artifacts",
    compute=compute, render=render))
