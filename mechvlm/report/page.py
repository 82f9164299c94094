"""The report page: how to read it, Table 1 and its chart, the output / per-category /
circular tables, Fig. 1 and Fig. 2 per model, the example heatmaps with the model's
answers, the optional sections grouped by section, and the run-info footer.

Every figure is a PNG ``<figure data-text-boxes=N data-layout-problems=M>``: N is how many
text boxes `mechvlm.viz.layout` measured on the figure's own renderer, M how many of them
overlap (or legends covering data); the browser test requires N > 0 and M = 0.
"""

from __future__ import annotations

import html
import warnings

from ..viz import Page, fig_attention_share, fig_received_attention, fig_table1, figure_to_img_html
from ..viz.layout import measure_layout
from ..viz.text import plain
from . import tables
from .examples import layers_shown

# the paper is in Japanese (大規模視覚言語モデルにおける視覚情報の伝播経路と Registering の考察); the page gives
# the title in English, which every browser can draw without CJK fonts
SEED000 = ("Sakajo, Qu, Kamigaito, Takamura, Yanaka, Watanabe: \"Visual information flow paths in large "
           "vision-language models, and Registering\" (in Japanese)")
NEO = ("Neo, Ong, Torr, Geva, Krueger, Barez: \"Towards interpreting visual information processing in "
       "vision-language models\"")

PAGE_STYLE = """<style>
.mechvlm-page{line-height:1.4}
.mechvlm-row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.mechvlm-fig{margin:8px 0;max-width:100%;display:table}
.mechvlm-fig figcaption{display:table-caption;caption-side:bottom}
.mechvlm-fig figcaption,.mechvlm-table caption{font-size:13px;color:#333;max-width:1060px;text-align:left;
  caption-side:bottom;padding:4px 0}
.mechvlm-table{margin:8px 0;font-size:13px}
.mechvlm-table thead th{background:#f3f3f3}
.mechvlm-table th[scope=row]{text-align:left;font-weight:normal}
.mechvlm-howto{background:#f7f7fb;border:1px solid #dde;padding:6px 14px;font-size:14px}
.mechvlm-example{border-top:1px solid #ddd;margin-top:14px;padding-top:6px}
.mechvlm-question{font-size:14px}
.mechvlm-model-tag{font-weight:bold;margin:10px 0 2px}
.mechvlm-footer{border-top:2px solid #ccc;margin-top:28px;font-size:13px}
.mechvlm-footer code{white-space:pre-wrap;word-break:break-all}
.mechvlm-toc{font-size:14px}
</style>"""

MODE_NOTE = (
    "The two readings of the knockout. pre_softmax_mask sets the blocked scores to −∞ before the "
    "softmax, so every row renormalises over the keys it may still see and the blocked keys are cut "
    "completely. post_softmax_zero zeroes the weights after the softmax without renormalising (the "
    "paper's Eq. 3–4 as written): the blocked keys stay in the denominator, the row sums to less "
    "than 1, and the values of the other keys come through scaled down.")


ROLE_NAMES = {"image": "image", "eoi": "EOI", "text": "text"}


NOT_SCORED_NOTE = ("Accuracy is not available: the benchmark has no answers (a test split). The "
                   "predictions and the output kinds are in mmbench_items.csv and results.json.")


def scored(knockout: dict) -> bool:
    """True when some condition has an accuracy (False for a TSV without answers)."""
    return any(s.get("accuracy") is not None for s in knockout.values())


def _esc(x) -> str:
    return html.escape(str(x))


def figure_html(fig, *, alt: str, caption: str, name: str) -> str:
    """A figure as ``<figure>`` (PNG ``<img>`` + caption) with its measured text layout."""
    boxes, problems = measure_layout(fig)
    n_boxes = len(boxes)
    if problems:
        warnings.warn(f"report figure {name}: {'; '.join(problems[:5])}", stacklevel=2)
    img = figure_to_img_html(fig, alt=alt, close=True)
    return (f'<figure class="mechvlm-fig" data-figure="{_esc(name)}" data-text-boxes="{n_boxes}" '
            f'data-layout-problems="{len(problems)}">{img}<figcaption>{_esc(caption)}</figcaption></figure>')


def _heading(page: Page, anchor: str, text: str, level: int = 2) -> None:
    page.add_html(f'<h{level} id="{anchor}">{_esc(text)}</h{level}>')


def how_to_read(runs, n_items: int, tsv: str, chance: float = 0.25) -> str:
    models = ", ".join(r.label for r in runs)
    li = [
        f"<b>What this is.</b> The analyses of {_esc(SEED000)} run on {len(runs)} model(s) ({_esc(models)}) "
        f"and the {n_items} items of {_esc(tsv)}: Table 1 (accuracy when the text may not attend the image "
        "tokens, or the end-of-image token, in all layers), Fig. 1 (how the text's attention splits between "
        "the image tokens and the end-of-image token) and Fig. 2 (how few image tokens carry that attention).",
        "<b>Token roles.</b> <i>image</i>: the image's placeholder tokens, one per merged patch of the vision "
        "tower (Qwen2.5-VL &lt;|image_pad|&gt;, Gemma3 image soft tokens); <i>EOI</i>: the end-of-image token "
        "right after them (&lt;|vision_end|&gt;, &lt;end_of_image&gt;); <i>text</i>: the prompt tokens after "
        "the image and the generated tokens.",
        f"<b>Knockout readings.</b> {_esc(MODE_NOTE)}",
        "<b>Numbers.</b> Accuracy is the fraction of items whose extracted letter equals the answer "
        "(VLMEvalKit's exact matching; each circular copy is an item). In brackets: the population standard "
        "deviation over items, sqrt(p(1−p)), as in the paper. Error bars in the charts: 95 % Wilson score "
        f"intervals of the accuracy over the items. A random guess scores {chance:.3f} here (1/4 with four "
        "options).",
        "<b>Attention share.</b> Normalised over the image and EOI keys only (attention to other text, the "
        "system prompt or BOS is left out): two readings, head-summed (sum the mass over heads, then take the "
        "ratio) and head-mean (the ratio per head, averaged over heads); Fig. 1 draws each in its own panel.",
        "<b>Toy models.</b> The shipped toys are ~1M-parameter models with the real architectures, trained on "
        "synthetic scenes; they read the image tokens directly, so unlike the paper's models blocking text→EOI "
        "changes nothing for them (see docs/toy_models.md).",
    ]
    seed_rows = [("Gemma3 4B", ".356 (.479)", ".169 (.375)", ".224 (.418)"),
                 ("Gemma3 12B", ".388 (.487)", ".277 (.447)", ".270 (.444)"),
                 ("Qwen2.5-VL 3B", ".392 (.488)", ".176 (.381)", ".207 (.405)"),
                 ("Qwen2.5-VL 7B", ".410 (.492)", ".086 (.281)", ".001 (.026)")]
    seed = tables.html_table("seed000_table1", ["model", "none", "text→img", "text→EOI"], seed_rows,
                             "For comparison: Table 1 of the paper (MMBench dev, knockout in all layers; "
                             "the paper gives one reading, Eq. 3–4).")
    return ('<div class="mechvlm-howto" id="how-to-read"><h2>How to read this page</h2><ul>'
            + "".join(f"<li>{x}</li>" for x in li) + "</ul>"
            + f"<details><summary>The paper's Table 1</summary>{seed}</details></div>")


def _toc(has_sections: bool) -> str:
    links = [("table1", "Table 1 and outputs"), ("categories", "Per category and circular"),
             ("fig1", "Fig. 1 attention share"), ("fig2", "Fig. 2 received attention"),
             ("examples", "Examples"), *([("analyses", "Further analyses")] if has_sections else []),
             ("run-info", "Run info")]
    return '<p class="mechvlm-toc">' + " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in links) + "</p>"


def _knockout_part(page: Page, runs, n_items: int, chance: float) -> None:
    ko = {r.label: r.knockout for r in runs}
    _heading(page, "table1", "Table 1: attention knockout in all layers")
    page.add_html(tables.table1_html(ko, n_items))
    if not any(scored(k) for k in ko.values()):
        page.add_text(NOT_SCORED_NOTE)
    page.add_html(figure_html(
        fig_table1(ko, chance=chance), alt="Table 1 as bars, one panel per knockout mode", name="table1",
        caption=(f"Table 1 as bars. One panel per knockout mode; one group per model; the bar colour says which "
                 f"attention of the text tokens is blocked (in every layer and head, generated tokens included). "
                 f"Bar: MMBench accuracy over the {n_items} items; label: accuracy (std over items); error bars: "
                 f"95 % Wilson score interval over the {n_items} items; dashed line: chance, the mean of "
                 f"1 / (number of options) over the items ({chance:.3f}).")))
    for r in runs:
        for name, why in getattr(r, "skipped", {}).items():
            page.add_text(f"{r.label}: not run: {name} ({why}).")
    page.add_html(tables.outputs_html(ko))
    _heading(page, "categories", "Per category and circular accuracy")
    page.add_html(tables.per_category_html(ko))
    page.add_html(tables.circular_html(ko))


def _share_caption(label: str, keys) -> str:
    a, b = (ROLE_NAMES.get(k, k) for k in keys[:2])
    why = "" if "eoi" in keys else " (this model has no end-of-image token, so the text tokens stand in for it)"
    return (f"{label}: share of the text tokens' attention on the {a} tokens vs the {b} token(s){why}, per "
            f"layer, averaged over the examples. Normalised over {a} + {b} only: share_{a} = f_{a} / "
            f"(f_{a} + f_{b}), f_role = Σ over text queries i, Σ over keys j of that role, of A_ij "
            "(attention to other tokens is left out, so the two parts add up to 1). Left: head-summed "
            "reading (f summed over heads before the ratio). Right: head-mean reading (the ratio per "
            "head, averaged over heads).")


def _share_part(page: Page, runs) -> None:
    _heading(page, "fig1", "Fig. 1: where the text's attention goes, image tokens vs the end-of-image token")
    figs = []
    for r in runs:
        s = r.share
        fig = fig_attention_share({"(a)": s, "(b)": s}, reading=("head_sum", "head_mean"), width=3.6,
                                  height=3.0, title=plain(r.label))
        figs.append(figure_html(
            fig, alt=f"attention share per layer, {r.label}", name=f"fig1:{r.label}",
            caption=_share_caption(r.label, s.keys)))
    page.add_html('<div class="mechvlm-row">' + "".join(figs) + "</div>")
    for r in runs:
        s = r.share
        hs, hm = s.mean_head_share.tolist(), s.mean_head_mean_share.tolist()
        cols = [[row[k] for row in hs] for k in range(len(s.keys))] + [[row[k] for row in hm] for k in range(len(s.keys))]
        names = [ROLE_NAMES.get(k, k) for k in s.keys]
        header = ["layer", *[f"{k}, head-summed" for k in names], *[f"{k}, head-mean" for k in names]]
        page.add_html(tables.per_layer_html(f"share:{r.label}", header, s.layers, cols,
                                            f"{r.label}: the shares of Fig. 1 (mean over examples), both readings."))


def _received_part(page: Page, runs) -> None:
    _heading(page, "fig2", "Fig. 2: how concentrated the text's attention on the image tokens is")
    figs = []
    for r in runs:
        shown = layers_shown(len(r.received.layers))
        drawn = [r.received.layers[i] for i in shown]
        fig = fig_received_attention({"": r.received}, layers=drawn, width=4.4, height=3.6, title=plain(r.label))
        which = ("one curve per layer" if len(drawn) == len(r.received.layers) else
                 f"layers drawn: {', '.join(map(str, drawn))} of {len(r.received.layers)} (all in the table)")
        figs.append(figure_html(
            fig, alt=f"cumulative received attention, {r.label}", name=f"fig2:{r.label}",
            caption=(f"{r.label}: r_j = Σ over text queries i of A_ij for every image token j, head-mean "
                     "reading (the pattern averaged over heads); tokens sorted by r, y = cumulative share "
                     "normalised over the image tokens only (Σ r = 1), x = fraction of the image tokens; mean "
                     f"over examples; {which}; dashed = uniform. Legend: fraction of the image "
                     "tokens that carries 50 / 80 / 90 % of the mass.")))
    page.add_html('<div class="mechvlm-row">' + "".join(figs) + "</div>")
    for r in runs:
        rec = r.received
        frac = rec.mean_frac_tokens.tolist()
        cols = [[row[t] for row in frac] for t in range(len(rec.thresholds))]
        page.add_html(tables.per_layer_html(
            f"received:{r.label}", ["layer", *(f"{int(round(t * 100))} % of the mass" for t in rec.thresholds)],
            rec.layers, cols, f"{r.label}: fraction of the image tokens that carries the mass (head-mean "
                              "reading, mean over examples).", fmt=".2f"))


def _outputs_for(run, index: int) -> list[list[str]]:
    rows = []
    for name, s in run.knockout.items():
        rec = next((x for x in s.get("items", []) if x["index"] == index), None)
        if rec is None:
            continue
        right = "" if rec.get("answer") is None else ("right" if rec.get("correct") else "wrong")
        rows.append([name, repr(rec.get("raw", "")), rec.get("prediction") or "none", right])
    return rows


def _examples_part(page: Page, runs) -> None:
    _heading(page, "examples", "Examples: where the text tokens look on the image")
    first = runs[0].examples
    if not first:
        page.add_text("No item with an image to show.")
        return
    layers_note = "; ".join(
        f"{r.label}: layers shown {', '.join(map(str, r.examples[0]['layers']))} of {r.n_layers}"
        + ("" if len(r.examples[0]["layers"]) == r.n_layers else " (evenly spaced)") for r in runs if r.examples)
    page.add_text(
        "Each row: one model, one item, the unmodified model. Colour: the mean attention weight that a text token "
        "gives to each image token, a_j = mean over the text queries and the heads of A_ij (post-softmax, "
        "0–1; uniform attention would be 1 / number of visible keys), drawn on the token's cell of the image; one "
        f"colour scale per row (0 to the row's maximum). {layers_note}. Under each row: what the model answered "
        "under every condition.")
    for k, ex in enumerate(first):
        opts = " ".join(f"{l}. {t}" for l, t in ex["options"].items())
        hint = f"Hint: {ex['hint']}. " if ex.get("hint") else ""
        parts = [f'<div class="mechvlm-example" data-example="{ex["index"]}">',
                 f'<p class="mechvlm-question"><b>Item {ex["index"]} ({_esc(ex["category"])})</b>: {_esc(hint)}'
                 f'{_esc(ex["question"])}<br>Options: {_esc(opts)}<br>Answer: {_esc(ex["answer"] or "not given")}</p>']
        for r in runs:
            mine = next((e for e in r.examples if e["index"] == ex["index"]), None)
            if mine is None:
                continue
            parts.append(f'<p class="mechvlm-model-tag">{_esc(r.label)}</p>')
            parts.append(f'<figure class="mechvlm-fig" data-figure="example:{_esc(r.label)}:{ex["index"]}" '
                         f'data-text-boxes="{mine["figure_text_boxes"]}" '
                         f'data-layout-problems="{len(mine["figure_layout_problems"])}">{mine["figure_html"]}'
                         f'<figcaption>{_esc(r.label)}, item {ex["index"]}: mean attention weight of the text '
                         f'tokens on each image token, layers {", ".join(map(str, mine["layers"]))} of '
                         f'{mine["n_layers"]}; scale 0 to {mine["vmax"]:.3f}.</figcaption></figure>')
            parts.append(tables.html_table(
                f"example_outputs:{r.label}:{ex['index']}", ["condition", "output", "letter read", "scored"],
                _outputs_for(r, ex["index"]), f"{r.label}, item {ex['index']}: the output under each condition."))
        parts.append("</div>")
        page.add_html("".join(parts))


def _sections_part(page: Page, runs) -> None:
    if not runs[0].sections:
        return
    _heading(page, "analyses", "Further analyses")
    for j, (section, _, _, _) in enumerate(runs[0].sections):
        page.add_html(f'<section class="mechvlm-analysis" data-analysis="{_esc(section.name)}">')
        for r in runs:
            _, _, items, n_widgets = r.sections[j]
            page.add_html(f'<div class="mechvlm-model-block" data-model="{_esc(r.label)}">'
                          f'<p class="mechvlm-model-tag">model: {_esc(r.label)}</p>')
            page.items.extend(items)
            page.n_widgets += n_widgets
            page.add_html("</div>")
        page.add_html("</section>")


def _footer(info: dict, runs) -> str:
    v = info["versions"]
    rows = [("command", info["command"]), ("device", info["device"]), ("dtype", info["dtype"]),
            ("wall time", f"{info['wall_s']} s in all; " + ", ".join(f"{k}: {s} s" for k, s in
                                                                 info["wall_s_per_model"].items())),
            ("models", "; ".join(f"{r.label} = {r.path} ({r.model_type}, {r.n_layers} layers)" for r in runs)),
            ("versions", ", ".join(f"{k} {x}" for k, x in v.items())), ("platform", info["platform"])]
    body = "".join(f"<tr><th scope=\"row\">{_esc(k)}</th><td><code>{_esc(x)}</code></td></tr>" for k, x in rows)
    return (f'<footer class="mechvlm-footer" id="run-info"><h2>Run info</h2>'
            f'<table class="mechvlm-table" data-table="run_info"><caption>To reproduce, run the command in a '
            f"checkout of the same versions.</caption><tbody>{body}</tbody></table></footer>")


def build_page(runs, *, n_items: int, tsv: str, info: dict, chance: float = 0.25) -> Page:
    """The whole report page for the model runs (`mechvlm.report.run.ModelRun`); ``chance``:
    the accuracy of a random guess, the mean of 1 / (number of options) over the items."""
    labels = ", ".join(r.label for r in runs)
    page = Page(f"mechvlm report: {labels}")
    page.add_html(PAGE_STYLE)
    page.add_text(f"{len(runs)} model(s): {labels}. Benchmark: {tsv}, {n_items} items. "
                  f"Wall time {info['wall_s']} s on {info['device']}, {info['dtype']}.")
    page.add_html(_toc(bool(runs[0].sections)))
    page.add_html(how_to_read(runs, n_items, tsv, chance))
    _knockout_part(page, runs, n_items, chance)
    _share_part(page, runs)
    _received_part(page, runs)
    _examples_part(page, runs)
    _sections_part(page, runs)
    page.add_html(_footer(info, runs))
    return page
