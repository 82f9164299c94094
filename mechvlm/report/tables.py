"""The report's HTML tables: Table 1, output kinds, per-category and circular accuracy, the
per-layer metric tables. Each is a real ``<table data-table="NAME">`` with a ``<caption>``,
a ``<thead>`` and one ``<tr>`` per row in ``<tbody>`` (the browser test counts them)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from ..mmbench.extract import OUTPUT_KINDS
from ..mmbench.report_tables import fmt_score, table1_rows

KIND_LABELS = {"letter": "a letter", "eos_only": "EOS only", "other": "other text"}


def html_table(name: str, header: Sequence, rows: Sequence[Sequence], caption: str, *,
               row_headers: int = 1) -> str:
    """``<table class="mechvlm-table" data-table=name>``; the first ``row_headers`` cells of
    each row are ``<th scope="row">``. Cells are escaped text."""
    esc = lambda c: html.escape(str(c))
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f'<th scope="row">{esc(c)}</th>' if i < row_headers else f"<td>{esc(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    return (f'<table class="mechvlm-table" data-table="{esc(name)}"><caption>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def table1_html(knockout_by_model: Mapping[str, Mapping], n_items: int) -> str:
    """Seed 000 Table 1: one row per model and knockout mode, columns none / text→img /
    text→EOI (the ``none`` column repeats in each mode's row, as in the paper)."""
    header, rows = table1_rows(knockout_by_model)
    return html_table("table1", header, rows,
                      f"Table 1. MMBench accuracy (population std over the {n_items} items in brackets), "
                      "with the text's attention to the image tokens or to the end-of-image token "
                      "blocked in all layers.", row_headers=2)


def outputs_html(knockout_by_model: Mapping[str, Mapping]) -> str:
    """Per model and condition: items, accuracy and the share (count) of each output kind."""
    rows = []
    for m, conds in knockout_by_model.items():
        for name, s in conds.items():
            counts, fr = s.get("outputs") or {}, s.get("output_fractions") or {}
            rows.append([m, name, s.get("n_items", s.get("n", "")), fmt_score(s.get("accuracy")),
                         *[f"{fr.get(k, 0.0):.3f} ({counts.get(k, 0)})" for k in OUTPUT_KINDS]])
    header = ["model", "condition", "items", "accuracy", *[KIND_LABELS.get(k, k) for k in OUTPUT_KINDS]]
    return html_table("outputs", header, rows,
                      "What the model wrote under each condition: fraction (count) of the items whose "
                      "output has one option letter (read with VLMEvalKit's rules), is the end-of-"
                      "sequence token only, or is other text.", row_headers=2)


def _categories(knockout_by_model: Mapping[str, Mapping], key: str) -> list[str]:
    cats = []
    for conds in knockout_by_model.values():
        for s in conds.values():
            part = s.get(key) if key == "per_category" else (s.get("circular") or {}).get("per_category")
            for c in part or {}:
                if c not in cats:
                    cats.append(c)
    return cats


def per_category_html(knockout_by_model: Mapping[str, Mapping]) -> str:
    """Accuracy (std) per MMBench category, per model and condition."""
    cats = _categories(knockout_by_model, "per_category")
    first = next(iter(next(iter(knockout_by_model.values())).values()))
    ns = {c: (first.get("per_category") or {}).get(c, {}).get("n") for c in cats}
    rows = []
    for m, conds in knockout_by_model.items():
        for name, s in conds.items():
            per = s.get("per_category") or {}
            rows.append([m, name, fmt_score(s.get("accuracy"), s.get("std")),
                         *[fmt_score(per[c]["accuracy"], per[c]["std"]) if c in per else "" for c in cats]])
    header = ["model", "condition", "all", *[f"{c} (n={ns[c]})" if ns[c] else c for c in cats]]
    return html_table("per_category", header, rows,
                      "Accuracy per MMBench category (std over the category's items in brackets); "
                      "chance is 1/4 with four options.", row_headers=2)


def circular_html(knockout_by_model: Mapping[str, Mapping]) -> str:
    """Circular accuracy (a question counts only if every rotation of its options is
    answered right), overall and per category, next to the originals-only accuracy; a
    note instead when the TSV has no circular copies."""
    if not any(s.get("circular") for conds in knockout_by_model.values() for s in conds.values()):
        return ('<p class="mechvlm-note" data-table="circular">Circular accuracy: not available, '
                "the TSV has no circular copies (rows with index + k·1,000,000).</p>")
    cats = _categories(knockout_by_model, "circular")
    rows = []
    for m, conds in knockout_by_model.items():
        for name, s in conds.items():
            circ, v0 = s.get("circular") or {}, s.get("vanilla_0") or {}
            per = circ.get("per_category") or {}
            rows.append([m, name, fmt_score(v0.get("accuracy")), circ.get("n", ""),
                         fmt_score(circ.get("accuracy"), circ.get("std")),
                         *[fmt_score(per[c]["accuracy"]) if c in per else "" for c in cats]])
    header = ["model", "condition", "originals only", "questions", "circular", *cats]
    return html_table("circular", header, rows,
                      "Circular evaluation (VLMEvalKit): a question is correct only when every "
                      "rotation of its options is; chance is (1/4)^rotations, so 0.000 under a "
                      "knockout means the model answers at chance. 'originals only': accuracy over "
                      "the unrotated rows.", row_headers=2)


def per_layer_html(name: str, header: Sequence[str], layers: Sequence[int], columns: Sequence[Sequence[float]],
                   caption: str, fmt: str = ".3f") -> str:
    """A per-layer table: ``columns[c][i]`` is column ``c`` at ``layers[i]``."""
    rows = [[layer, *(format(col[i], fmt) for col in columns)] for i, layer in enumerate(layers)]
    return html_table(name, header, rows, caption)
