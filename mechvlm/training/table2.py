"""Seed 000 Table 2 from ``mechvlm report`` results: MMBench accuracy (std) per Registering
variant, the output kinds, the Table 1 conditions under the mask and the text -> registers
attention share. `scripts/registering_table2.py` runs the fine-tunes and reports and ships
the summary as ``mechvlm/assets/registering_table2.json``; `table2_markdown` renders it."""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED_TABLE2 = Path(__file__).resolve().parent.parent / "assets" / "registering_table2.json"
#: the order of the seed's Table 2, plus the EOI-only variant of METHODS section 4
VARIANT_ORDER = ("base", "none", "eoi", "16", "256")
VARIANT_LABELS = {"base": "shipped toy, not fine-tuned", "none": "fine-tuned (no registering)",
                  "eoi": "w/ registering (EOI)", "16": "w/ registering (16 tokens)",
                  "256": "w/ registering (256 tokens)"}


def table2_entry(results: dict, run: dict | None = None, log: list[dict] | None = None) -> dict:
    """One variant's row from a report's ``results.json`` (and its fine-tuning ``run.json``
    and ``log.jsonl`` rows: the validation-loss curve)."""
    ko = results["knockout"]
    none = ko["none"]
    entry = {
        "accuracy": none["accuracy"], "std": none["std"], "n": none["n"],
        "circular": (none.get("circular") or {}).get("accuracy"),
        "outputs": none["output_fractions"],
        "per_category": {c: v["accuracy"] for c, v in none["per_category"].items()},
        "conditions": {name: {"accuracy": c["accuracy"], "std": c["std"], "outputs": c["output_fractions"]}
                       for name, c in ko.items()},
        "text_to_image_eoi_share": results["attention_share"]["mean_head_share"],
        "report_wall_s": results.get("wall_s"),
    }
    reg = results.get("analyses", {}).get("registering")
    if reg is not None:
        entry["text_to_registers"] = reg["text_to_registers"]
        entry["registering"] = reg["registering"]
    if run is not None:
        entry["training"] = {k: run.get(k) for k in ("steps", "final_loss", "first_val_loss", "final_val_loss",
                                                   "wall_s", "median_tokens_per_s", "n_train", "n_val")}
        entry["training"]["lr"] = run["config"]["lr"]
        entry["training"]["global_batch"] = run["config"]["global_batch"]
    if log is not None:
        entry.setdefault("training", {})["val_curve"] = [[r["step"], r["val_loss"]] for r in log if "val_loss" in r]
    return entry


def load_table2(path: str | Path | None = None) -> dict:
    """The shipped (or a given) Table 2 JSON."""
    return json.loads(Path(path or SHIPPED_TABLE2).read_text())


def table2_markdown(table: dict) -> str:
    """Markdown: per model, accuracy (std) and output kinds per variant."""
    lines = ["| model | variant | accuracy (std) | circular | letter | EOS only | other | val loss |",
             "|---|---|---|---|---|---|---|---|"]
    for model, rows in table["table2"].items():
        for v in [v for v in VARIANT_ORDER if v in rows]:
            r = rows[v]
            o = r["outputs"]
            val = (r.get("training") or {}).get("final_val_loss")
            circ = "" if r.get("circular") is None else f"{r['circular']:.3f}"
            lines.append(f"| {model} | {VARIANT_LABELS.get(v, v)} | {r['accuracy']:.3f} ({r['std']:.3f}) | {circ} | "
                         f"{o.get('letter', 0):.3f} | {o.get('eos_only', 0):.3f} | {o.get('other', 0):.3f} | "
                         f"{'' if val is None else f'{val:.3f}'} |")
    return "\n".join(lines)


def conditions_markdown(table: dict) -> str:
    """Markdown: Table 1's conditions (pre-softmax readings) on each fine-tuned variant."""
    names = ("none", "text→image:pre_softmax_mask", "text→EOI:pre_softmax_mask", "text→image:post_softmax_zero",
             "text→EOI:post_softmax_zero")
    lines = ["| model | variant | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for model, rows in table["table2"].items():
        for v in [v for v in VARIANT_ORDER if v in rows]:
            c = rows[v]["conditions"]
            cells = [f"{c[n]['accuracy']:.3f}" if n in c else "" for n in names]
            lines.append(f"| {model} | {VARIANT_LABELS.get(v, v)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def registers_share_markdown(table: dict) -> str:
    """Markdown: the head-mean share of text -> registers (EOI + inserted) per layer."""
    lines = ["| model | variant | text → registers per layer |", "|---|---|---|"]
    for model, rows in table["table2"].items():
        for v in [v for v in VARIANT_ORDER if v in rows and "text_to_registers" in rows[v]]:
            cells = " / ".join(f"{x:.2f}" for x in rows[v]["text_to_registers"])
            lines.append(f"| {model} | {VARIANT_LABELS.get(v, v)} | {cells} |")
    return "\n".join(lines)


def val_curve_markdown(table: dict) -> str:
    """Markdown: the validation caption loss every logged step, per fine-tuned variant."""
    curves = {(m, v): rows[v]["training"]["val_curve"] for m, rows in table["table2"].items()
              for v in VARIANT_ORDER if v in rows and "val_curve" in (rows[v].get("training") or {})}
    if not curves:
        return ""
    steps = sorted({s for c in curves.values() for s, _ in c})
    lines = ["| model | variant | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for (m, v), c in curves.items():
        at = dict((s, x) for s, x in c)
        lines.append(f"| {m} | {VARIANT_LABELS.get(v, v)} | " + " | ".join(
            f"{at[s]:.2f}" if s in at else "" for s in steps) + " |")
    return "\n".join(lines)
