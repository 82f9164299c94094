"""Write the report: ``report.html`` (self-contained: PNG figures embedded, tables),
``results.json`` (every number), the MMBench CSVs, and a printed summary."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch

from ..fileio import write_text
from ..mmbench.report_tables import outputs_table, save_results, table1

MODE_NOTE = (
    "Two readings of the knockout (METHODS §3). pre_softmax_mask sets the blocked scores to "
    "-inf before the softmax, so each row renormalises and the blocked keys are fully cut. "
    "post_softmax_zero zeroes the weights after the softmax without renormalising (seed 000 "
    "Eq. 3-4 as written): the blocked keys stay in the denominator, and part of their effect "
    "leaks through the unchanged values of the other keys.")


NOT_SCORED_NOTE = ("Accuracy is not available: the benchmark has no answers (a test split). The "
                   "predictions and the output kinds are in mmbench_items.csv and results.json.")


def scored(knockout: dict) -> bool:
    """True when some condition has an accuracy (False for a TSV without answers)."""
    return any(s.get("accuracy") is not None for s in knockout.values())


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 6)  # NaN -> null
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def metric_summary(share, received) -> dict:
    """The metric numbers of the JSON: example means per layer (and head), and per-example
    head-level values (no per-token arrays)."""
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


def _table(header: list, rows: list[list], caption: str) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<table class="mechvlm-table"><caption>{html.escape(caption)}</caption>'
            f"<tr>{th}</tr>{body}</table>")


def _per_layer(layers, values: torch.Tensor, fmt: str) -> list[list]:
    return [[layer, *(format(v, fmt) for v in values[i].tolist())] for i, layer in enumerate(layers)]


def _pre(text: str) -> str:
    return "<pre>" + html.escape(text) + "</pre>"


def label_of(results: dict) -> str:
    return Path(results["model"]).name


def write_outputs(results: dict, share, received, out: Path, examples: list[str] = (),
                  sections: list = (), ctx=None) -> None:
    """Write report.html, results.json and the MMBench CSVs into ``out``. ``sections``:
    ``[(AnalysisSection, result), ...]`` drawn after the seed-000 part."""
    from ..viz import Page, fig_attention_share, fig_knockout, fig_received_attention

    out.mkdir(parents=True, exist_ok=True)
    results.update(metric_summary(share, received))
    write_text(out / "results.json", json.dumps(_jsonable(results), indent=1) + "\n")
    label = label_of(results)
    save_results({label: results["knockout"]}, out)
    page = Page(f"mechvlm report: {label}")
    page.add_text(f"Model {results['model']} ({results['model_type']}); benchmark {results['mmbench']}; "
                  f"{results['n_items']} items; {results['wall_s']} s.")
    page.add_heading("Table 1: attention knockout in all layers (accuracy, std over items)")
    page.add_html(_pre(table1({label: results["knockout"]})))
    page.add_html(_pre(outputs_table({label: results["knockout"]})))
    if not scored(results["knockout"]):
        page.add_text(NOT_SCORED_NOTE)
    page.add(fig_knockout({label: results["knockout"]}), alt="knockout accuracy")
    page.add_text(MODE_NOTE)
    for name, why in results.get("skipped", {}).items():
        page.add_text(f"Not run: {name} ({why}).")
    page.add_heading(f"Fig. 1: attention share of the text, {' vs '.join(share.keys)}, per layer")
    page.add(fig_attention_share(share), alt="attention share per layer")
    page.add_html(_table(["layer", *share.keys], _per_layer(share.layers, share.mean_head_share, ".3f"),
                         "head-summed share, mean over examples"))
    page.add_heading("Fig. 2: cumulative attention the image tokens receive from the text")
    page.add(fig_received_attention(received), alt="cumulative received attention")
    page.add_html(_table(["layer", *(f"{int(t * 100)}% of the mass" for t in received.thresholds)],
                         _per_layer(received.layers, received.mean_frac_tokens, ".2f"),
                         "fraction of image tokens that carries the mass (head mean, mean over examples)"))
    if examples:
        page.add_heading("Examples: attention of the text tokens on the image (head mean)")
        for fragment in examples:
            page.add_html(fragment)
    for section, result in sections:
        section.render(result, page, ctx)
    page.save(out / "report.html")


def print_summary(results: dict, out: Path) -> None:
    label = label_of(results)
    print(table1({label: results["knockout"]}))
    print()
    print(outputs_table({label: results["knockout"]}))
    for name, why in results.get("skipped", {}).items():
        print(f"not run: {name} ({why})")
    if not scored(results["knockout"]):
        print("\naccuracy: not available (the benchmark has no answers)")
    share = results["attention_share"]
    m = torch.as_tensor(share["mean_head_share"])
    print("\nattention share of the text (" + " / ".join(share["keys"]) + "), head-summed, per layer:")
    print("  " + "  ".join(f"L{layer} " + "/".join(f"{v:.2f}" for v in m[i].tolist())
                           for i, layer in enumerate(share["layers"])))
    print(f"\nwrote {out / 'report.html'} and {out / 'results.json'} ({results['wall_s']} s)")
