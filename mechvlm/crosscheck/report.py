"""Per-quantity, per-layer differences and the printed table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import Tensor

from mechvlm.crosscheck.tolerances import Tol

# Order of the quantities inside one layer (what is computed first diverges first).
_STAGE = {"embed": 0, "pattern": 1, "resid_post": 2, "share/image": 3, "share/eoi": 3, "share/text": 3}


@dataclass
class Row:
    """One compared quantity (at one layer, or for the whole model when ``layer`` is None).

    ``max_abs`` = max |mechvlm - HF| over the compared entries; ``rel`` = max_abs /
    max |HF| (the scale the tolerance's ``rtol`` multiplies); ``bound`` = the tolerance
    ``atol + rtol * max|HF|`` it was held to."""

    quantity: str
    layer: int | None
    kind: str
    max_abs: float
    rel: float
    scale: float
    bound: float
    passed: bool
    noise: float = math.nan
    note: str = ""


def diff(ours: Tensor, ref: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """``(max_abs, max|ref|)`` over ``mask`` (broadcast from the leading dims). NaNs on
    both sides at the same place count as equal; a NaN on one side only is infinite."""
    a, b = ours.detach().float().cpu(), ref.detach().float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: mechvlm {tuple(a.shape)} vs HF {tuple(b.shape)}")
    if mask is not None:
        m = mask.cpu()
        while m.ndim < a.ndim:
            m = m[..., None]
        m = m.expand_as(a)
        a, b = a[m], b[m]
    if a.numel() == 0:
        return 0.0, 0.0
    both_nan = a.isnan() & b.isnan()
    d = (a - b).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf)
    return float(d.max()), float(b.abs().nan_to_num(nan=0.0).max())


@dataclass
class CrosscheckReport:
    """Everything one cross-check measured.

    Attributes:
        model: a short description of the model; ``dtype``: the dtype both sides ran in.
        rows: every compared quantity (see `Row`), in the printed order.
        tolerances: the `Tol` of each quantity kind.
        timing: ``crosscheck_s`` (the whole cross-check: ``setup_s`` copying / wrapping /
            building inputs, then ``runs_s``), ``mechvlm_forward_s`` (one plain mechvlm
            forward on the same batch, median of 5 after a warm-up, timed afterwards) and
            ``ratio`` = crosscheck_s / mechvlm_forward_s.
        share_source: where mechvlm's attention share came from.
        effects: max |knockout - clean| logits per knockout (HF side), so that a
            knockout that changes nothing is visible as such.
        skipped: experiments not run and why (a text->EOI knockout on a model without EOI).
    """

    model: str
    dtype: str
    rows: list[Row] = field(default_factory=list)
    tolerances: dict[str, Tol] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    share_source: str = ""
    effects: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, quantity: str, layer: int | None, kind: str, ours: Tensor, ref: Tensor,
            mask: Tensor | None = None, ref32: Tensor | None = None, note: str = "") -> Row:
        """Compare ``ours`` (mechvlm) with ``ref`` (HF) over ``mask``; ``ref32``: the same
        HF quantity computed in fp32, which sets the noise term of the bound."""
        max_abs, scale = diff(ours, ref, mask)
        noise = diff(ref, ref32, mask)[0] if ref32 is not None else math.nan
        tol = self.tolerances[kind]
        bound = tol.bound(scale, 0.0 if math.isnan(noise) else noise)
        rel = max_abs / scale if scale > 0 else 0.0 if max_abs == 0 else math.inf
        row = Row(quantity, layer, kind, max_abs, rel, scale, bound, max_abs <= bound, noise, note)
        self.rows.append(row)
        return row

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def first_divergence(self) -> Row | None:
        """The earliest failing per-layer quantity (lowest layer; within a layer, the
        embedding, then the pattern, then the layer output), else the first failing
        model-level row, else None."""
        per_layer = [r for r in self.failures if r.layer is not None]
        if per_layer:
            return min(per_layer, key=lambda r: (r.layer, _STAGE.get(r.quantity, 9)))
        return self.failures[0] if self.failures else None

    @property
    def first_diverging_layer(self) -> int | None:
        r = self.first_divergence
        return r.layer if r is not None else None

    def summary(self) -> str:
        if self.passed:
            return f"PASS: all {len(self.rows)} quantities within tolerance ({self.dtype})"
        r = self.first_divergence
        where = f"layer {r.layer}" if r.layer is not None else "model level"
        return (f"FAIL: {len(self.failures)} of {len(self.rows)} quantities out of tolerance; first divergence "
                f"at {where}: {r.quantity} max|diff| {r.max_abs:.3e} > {r.bound:.3e}")

    def table(self) -> str:
        noisy = any(not math.isnan(r.noise) for r in self.rows)
        head = f"{'quantity':46s} {'layer':>5s} {'max_abs':>10s} {'rel':>10s}"
        head += f" {'hf_noise':>10s}" if noisy else ""
        head += f" {'bound':>10s}  ok"
        lines = [f"cross-check {self.model} ({self.dtype}): mechvlm vs nnsight(HF eager)", head, "-" * len(head)]
        for r in self.rows:
            layer = "-" if r.layer is None else str(r.layer)
            noise = f" {r.noise:10.3e}" if noisy else ""
            lines.append(f"{r.quantity:46s} {layer:>5s} {r.max_abs:10.3e} {r.rel:10.3e}{noise} {r.bound:10.3e}  "
                         f"{'ok' if r.passed else 'FAIL'}{'  ' + r.note if r.note else ''}")
        if self.effects:
            lines.append("knockout effect on HF logits (max |knockout - clean|): " +
                         ", ".join(f"{k} {v:.3e}" for k, v in self.effects.items()))
        if noisy:
            lines.append("hf_noise: max |HF - HF in fp32| (HF's own rounding error; the bound is "
                         "atol + rtol * max|HF| + noise_factor * hf_noise)")
        for what, why in self.skipped.items():
            lines.append(f"skipped {what}: {why}")
        if self.share_source:
            lines.append(f"mechvlm attention share from: {self.share_source}")
        if self.timing:
            t = self.timing
            lines.append(f"time: cross-check {t['crosscheck_s']:.2f} s (setup {t['setup_s']:.2f} s) = {t['ratio']:.0f} x "
                         f"one mechvlm forward ({t['mechvlm_forward_s'] * 1e3:.1f} ms)")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """``{"passed", "first_diverging_layer", "rows": [...], "by_quantity": {quantity:
        {layer: {"max_abs", "rel"}}}, "timing", ...}`` (plain Python values)."""
        def clean(v):  # NaN (noise not measured) -> None, so the dict is valid JSON
            return None if isinstance(v, float) and math.isnan(v) else v

        by_q: dict[str, dict] = {}
        for r in self.rows:
            by_q.setdefault(r.quantity, {})["all" if r.layer is None else r.layer] = {
                "max_abs": r.max_abs, "rel": r.rel, "noise": clean(r.noise), "bound": r.bound, "passed": r.passed}
        first = self.first_divergence
        return {
            "model": self.model, "dtype": self.dtype, "passed": self.passed,
            "first_diverging_layer": self.first_diverging_layer,
            "first_divergence": None if first is None else {k: clean(v) for k, v in asdict(first).items()},
            "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows], "by_quantity": by_q,
            "tolerances": {k: asdict(v) for k, v in self.tolerances.items()},
            "timing": dict(self.timing), "share_source": self.share_source, "effects": dict(self.effects),
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        return self.table()
