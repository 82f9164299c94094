"""Write the report: ``report.html`` (self-contained: PNG figures embedded, tables),
``results.json`` (every number), CSVs, and a printed summary."""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ..mmbench.report_tables import format_table1, save_results_csv

MODE_NOTE = (
    "Two readings of the knockout (METHODS §3): pre_softmax_mask sets the blocked scores to "
    "-inf before the softmax, so each row renormalises and the blocked keys are fully cut; "
    "post_softmax_zero zeroes the weights after the softmax without renormalising (seed 000 "
    "Eq. 3-4 as written): the blocked keys stay in the denominator, so part of their effect "
    "leaks.")


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return None if x != x else round(x, 6)  # NaN -> null
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def metric_summary(share, received) -> dict:
    """The metric numbers kept in the JSON: example means per layer (and head), and the
    per-example head-mean values (no per-token arrays)."""
    return {
        "attention_share": {
            "layers": share.layers, "keys": share.keys, "query": share.query,
            "mean_head_share": share.mean_head_share, "mean_head_mean_share": share.mean_head_mean_share,
            "mean_share_per_head": share.mean_share, "head_share_per_example": share.head_share,
            "n_queries": share.n_queries},
        "received_attention": {
            "layers": received.layers, "thresholds": list(received.thresholds),
            "query": received.query, "key": received.key,
            "mean_frac_tokens": received.mean_frac_tokens,
            "mean_frac_tokens_per_head": received.mean_frac_tokens_per_head,
            "curve_x": received.curve_x, "mean_curve": received.mean_curve,
            "frac_tokens_per_example": received.frac_tokens_head_mean},
    }


def _table(header: list[str], rows: list[list], caption: str) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<table class="mechvlm-table"><caption>{html.escape(caption)}</caption>'
            f"<tr>{th}</tr>{body}</table>")


def _share_rows(share) -> tuple[list[str], list[list]]:
    m = share.mean_head_share
    return (["layer", *share.keys],
            [[layer, *(f"{v:.3f}" for v in m[i].tolist())] for i, layer in enumerate(share.layers)])


def _received_rows(received) -> tuple[list[str], list[list]]:
    m = received.mean_frac_tokens
    return (["layer", *(f"{int(t * 100)}% of mass" for t in received.thresholds)],
            [[layer, *(f"{v:.2f}" for v in m[i].tolist())] for i, layer in enumerate(received.layers)])


def knockout_for_plot(knockout: dict, label: str) -> dict:
    """``{label mode: {condition: entry}}`` for `mechvlm.viz.fig_knockout`: one row per mode,
    ``none`` repeated in each."""
    conds = knockout["conditions"]
    rows: dict[str, dict] = {}
    for name, res in conds.items():
        if name == "none":
            continue
        target, mode = name.rsplit(" ", 1) if " " in name else (name, "")
        row = rows.setdefault(f"{label} {mode.strip('()')}".strip(), {})
        if "none" in conds:
            row.setdefault("none", conds["none"])
        row[target] = res
    return rows or {label: {"none": conds["none"]}}


def write_outputs(results: dict, share, received, model, builder, items, out: Path) -> None:
    from ..viz import Page, fig_attention_share, fig_knockout, fig_received_attention, knockout_table_html

    out.mkdir(parents=True, exist_ok=True)
    results.update(metric_summary(share, received))
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    save_results_csv(results["knockout"], out)
    label = Path(results["model"]).name
    page = Page(f"mechvlm report: {label}")
    page.add_text(f"model {results['model']} ({results['model_type']}); benchmark {results['mmbench']}; "
                  f"{results['n_items']} items; {results['wall_s']} s.")
    page.add_heading("Table 1: attention knockout (accuracy, std over items)")
    table = knockout_for_plot(results["knockout"], label)
    page.add(knockout_table_html(table))
    page.add(fig_knockout(table), alt="knockout accuracy")
    page.add_html("<pre>" + html.escape(format_table1({label: results["knockout"]})) + "</pre>")
    page.add_text(MODE_NOTE)
    page.add_heading("Fig. 1: attention share, text -> image vs text -> EOI, per layer")
    page.add(fig_attention_share(share), alt="attention share per layer")
    page.add_html(_table(*_share_rows(share), "head-summed share, mean over examples"))
    page.add_heading("Fig. 2: cumulative attention received by the image tokens from the text")
    page.add(fig_received_attention(received), alt="cumulative received attention")
    page.add_html(_table(*_received_rows(received), "fraction of image tokens carrying the mass"))
    page.save(out / "report.html")


def print_summary(results: dict) -> None:
    label = Path(results["model"]).name
    print(format_table1({label: results["knockout"]}))
    share = results["attention_share"]
    m = torch.as_tensor(share["mean_head_share"])
    print("attention share (text -> " + " / ".join(share["keys"]) + "), head-summed, mean over examples:")
    print("  " + "  ".join(f"L{layer}: " + "/".join(f"{v:.2f}" for v in m[i].tolist())
                           for i, layer in enumerate(share["layers"])))
    print(f"wrote {results['config']['out']}/report.html and results.json ({results['wall_s']} s)")
