"""Correctness rows of ``compare_peers.py``: the tools must agree where they should.

Every row is ``max |a - b|`` over the compared tensors (last-position logits, attention
patterns, attention shares) against the bound of the mechvlm cross-check tolerances
(`mechvlm.crosscheck.tolerances`, the fixed ones in low precision). ``expect``: ``agree``
(``<= bound``), ``differ`` (``> bound``: a knockout must change the logits, or the agreement
rows after it say nothing), ``equal`` (bitwise) or ``observed`` (a finding, no verdict: does
the bridge's pattern edit take effect?).
"""

from __future__ import annotations

import torch

BRIDGE_KO = {"bridge_ko_post": ("hook_pattern", "nn_ko_post"), "bridge_ko_pre": ("hook_attn_scores", "nn_ko_pre_eager")}


def _max_diff(a, b) -> tuple[float, float]:
    if isinstance(a, (list, tuple)):
        pairs = [_max_diff(x, y) for x, y in zip(a, b)]
        return max(d for d, _ in pairs), max(s for _, s in pairs)
    a, b = a.float(), b.float()
    ok = ~(a.isnan() & b.isnan())  # a share is NaN where an example has no query: equal then
    return float((a - b)[ok].abs().max()), float(b[ok].abs().max())


class Checks:
    """Correctness rows: ``max |a - b|`` against the mechvlm cross-check tolerances."""

    def __init__(self, dtype: torch.dtype):
        from mechvlm.crosscheck.tolerances import tolerances_for

        self.tol = tolerances_for(dtype, measured_noise=False)
        self.rows: list[dict] = []

    def add(self, section, check, a, b, kind="logits", expect="agree", note="") -> dict:
        diff, scale = _max_diff(a, b)
        bound = self.tol[kind].bound(scale)
        ok = {"agree": diff <= bound, "differ": diff > bound, "equal": diff == 0.0}.get(expect)
        row = {"section": section, "check": check, "kind": kind, "max_abs_diff": diff, "bound": bound,
               "expect": expect, "pass": ok, "note": note}
        self.rows.append(row)
        return row


def check_main(checks: Checks, out: dict) -> set[str]:
    """Correctness rows of forward / patterns / knockout; returns the bridge knockouts whose
    edit takes effect (those are timed)."""
    ref = out["hf_sdpa"]
    for k in ("mech", "hf_eager", "bridge"):
        checks.add("forward", f"{k} logits vs HF sdpa", out[k], ref)
    for k in ("mech_cache", "bridge_cache"):
        checks.add("patterns", f"{k} patterns vs HF eager attentions", out[k][1], out["hf_eager_attn"][1], "pattern")
    checks.add("knockout", "knockout changes the logits (mechvlm pre vs clean)", out["mech_ko_pre"], out["mech"],
               expect="differ")
    checks.add("knockout", "knockout changes the logits (mechvlm post vs clean)", out["mech_ko_post"], out["mech"],
               expect="differ")
    checks.add("knockout", "mechvlm pre_softmax_mask vs nnsight mask edit (HF sdpa)", out["mech_ko_pre"], out["nn_ko_pre"])
    checks.add("knockout", "mechvlm pre_softmax_mask vs nnsight softmax-input edit (HF eager)", out["mech_ko_pre"],
               out["nn_ko_pre_eager"])
    checks.add("knockout", "mechvlm post_softmax_zero vs nnsight softmax-output edit (HF eager)",
               out["mech_ko_post"], out["nn_ko_post"])
    works = set()
    for k, (point, nn_ref) in BRIDGE_KO.items():
        warn = out.get("_warnings", {}).get(k, [])
        effect = checks.add("knockout", f"bridge {point} edit changes the logits (vs bridge clean)", out[k],
                            out["bridge"], expect="observed", note=" | ".join(warn)[:300])
        if effect["max_abs_diff"] > effect["bound"]:
            works.add(k)
            checks.add("knockout", f"bridge {point} edit vs {nn_ref}", out[k], out[nn_ref])
        else:
            effect["note"] = (f"edit had no effect: max |Δlogits| = {effect['max_abs_diff']:.3g}; the bridge "
                              f"discards it" + (f" (it warns: {warn[0][:160]})" if warn else ""))
    return works


def check_share(checks: Checks, out: dict, section: str, note: str = "") -> None:
    for k in ("mech_share", "bridge_share"):
        checks.add(section, f"{k} vs HF eager attentions -> share{note}", out[k], out["hf_eager_share"], "share")


def check_knockout_scaling(checks: Checks, out: dict, note: str) -> None:
    checks.add("scaling", f"mechvlm pre_softmax_mask vs nnsight mask edit (HF sdpa){note}", out["mech_ko_pre"],
               out["nn_ko_pre"])
    checks.add("scaling", f"mechvlm pre_softmax_mask vs nnsight softmax-input edit (HF eager){note}",
               out["mech_ko_pre"], out["nn_ko_pre_eager"])
