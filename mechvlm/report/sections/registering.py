"""Report section ``registering``: where the text's attention goes in a Registering model
(seed 000 section 4): the share of text -> registers (the EOI and the inserted register
tokens) per layer, next to image, image start, prefix and text. On a Registering checkpoint
the report runs under its mask (so text -> image is 0) and adds this section by itself; on
another model the EOI is the would-be register."""

from __future__ import annotations

from dataclasses import dataclass

from ...metrics import attention_share
from . import AnalysisSection, ReportContext, register_analysis

KEYS = ("image", "eoi", "register", "image_start", "prefix", "text")


@dataclass
class RegisteringShare:
    """``share``: the `AttentionShareResult` of text queries over `KEYS` (these roles
    partition the real tokens, so a share is the fraction of the text's attention);
    ``registering``: the model's setting (None without one)."""

    share: object
    registering: dict | None

    def registers_share(self) -> list[float]:
        """Per layer: the head-mean share of text -> (EOI + inserted registers)."""
        m = self.share.mean_head_mean_share
        keys = list(self.share.keys)
        return (m[:, keys.index("eoi")] + m[:, keys.index("register")]).tolist()

    def to_dict(self) -> dict:
        return {"registering": self.registering, "text_to_registers": self.registers_share(),
                "layers": list(self.share.layers), "attention_share": self.share.to_dict()}


def compute(ctx: ReportContext) -> RegisteringShare:
    share = attention_share(ctx.model, ctx.batches, query="text", keys=list(KEYS), progress=ctx.progress)
    return RegisteringShare(share, getattr(ctx.model.cfg, "registering", None))


def render(result: RegisteringShare, page, ctx: ReportContext) -> None:
    from ...viz import fig_attention_share

    reg = result.registering or {}
    what = f"variant {reg.get('variant')}, {reg.get('n_registers', 0)} inserted registers, mask {reg.get('mask')}" \
        if reg else "not a Registering model: the EOI stands for the register"
    page.add_heading("Registering: text attention onto the registers")
    page.add_text(f"{what}. Share of the text tokens' attention (head mean, averaged over examples) that "
                  "lands on each key role; 'registers' = the EOI plus the inserted register tokens.")
    page.add(fig_attention_share(result.share, reading="head_mean"), alt="text attention share per key role")
    cells = " | ".join(f"L{l} {v:.3f}" for l, v in zip(result.share.layers, result.registers_share()))
    page.add_text(f"text -> registers per layer: {cells}")


SECTION = register_analysis(AnalysisSection(
    name="registering", title="Registering: text -> registers",
    description="attention share of the text onto the registers (EOI + inserted), per layer",
    compute=compute, render=render))
