"""`mechvlm report` on several models: the JSON, the printed Table 1, the page's tables,
figures, examples, sections and footer.

The two shipped toys run once (`report_helpers.toy_runs`, 8 items); the second model's
numbers are checked against references computed without the report (HF's own Gemma3
model for the greedy first token, the metric called directly for the section)."""

from __future__ import annotations

import json
import re
import shlex
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from report_helpers import LIMIT, relabelled, toy_runs

from mechvlm import cli
from mechvlm.mmbench import load_mmbench
from mechvlm.mmbench.conditions import CONDITIONS
from mechvlm.mmbench.scoring import score_records
from mechvlm.processing import InputBuilder
from mechvlm.report.page import build_page
from mechvlm.report.render import print_summary, write_outputs
from mechvlm.report.run import ReportConfig
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED

pytest.importorskip("matplotlib")
LABELS = ["toy_qwen2_5_vl", "toy_gemma3"]
LONG_LABELS = ["Qwen2.5-VL-7B-Instruct", "gemma-3-12b-it-long-checkpoint-name", "Qwen2.5-VL-3B-Instruct",
               "gemma-3-4b-it"]


class Tables(HTMLParser):
    """``{data-table: [[cell text, ...] per body row]}`` and every ``<figure>``'s attributes."""

    def __init__(self):
        super().__init__()
        self.tables, self.figures, self.sections = {}, [], []
        self._table = self._row = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("data-table")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "figure":
            self.figures.append(a)
        elif tag in ("section", "div") and ("data-analysis" in a or "data-model" in a):
            self.sections.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html_text: str) -> Tables:
    p = Tables()
    p.feed(html_text)
    return p


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cfg, items, runs, info = toy_runs()
    out = tmp_path_factory.mktemp("two-models")
    results = write_outputs(runs, cfg, items, out, info)
    return cfg, runs, results, out


def test_default_models_are_both_shipped_toys(monkeypatch):
    assert ReportConfig().model_dirs() == [SHIPPED["qwen2_5_vl"], SHIPPED["gemma3"]]
    seen = {}
    monkeypatch.setattr("mechvlm.report.run_report", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["report", "--model", "a", "--model", "b/c", "--examples", "2"]) == 0
    assert seen["cfg"].model_dirs() == [Path("a"), Path("b/c")]
    assert seen["cfg"].examples == 2


def test_two_models_json_and_printed_table(written, capsys):
    from test_report import _assert_first_tokens_match_hf

    cfg, runs, results, out = written
    saved = json.loads((out / "results.json").read_text())
    assert saved["labels"] == LABELS and [m["model_type"] for m in saved["models"]] == ["qwen2_5_vl", "gemma3"]
    # the one-model keys stay, describing the first model
    for key in ("attention_share", "received_attention", "knockout", "analyses"):
        assert saved[key] == saved["models"][0][key]
    assert saved["n_items"] == LIMIT and set(saved["models"][1]["knockout"]) == set(CONDITIONS)
    assert saved["run"]["wall_s"] > 0 and set(saved["run"]["wall_s_per_model"]) == set(LABELS)
    items = load_mmbench(SHIPPED_TSV)[:LIMIT]
    _assert_first_tokens_match_hf(SHIPPED["gemma3"], items, saved["models"][1]["knockout"]["none"]["items"])
    print_summary(results, out)
    printed = capsys.readouterr().out
    rows = [l for l in printed.splitlines() if l.startswith("| toy_") and "_softmax_" in l and "text→" not in l]
    assert [r.split("|")[1].strip() for r in rows] == [LABELS[0]] * 2 + [LABELS[1]] * 2  # model x mode
    summary = (out / "mmbench_summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2 * len(CONDITIONS)


def test_two_models_page_tables(written):
    cfg, runs, results, out = written
    page = parse((out / "report.html").read_text())
    t = page.tables
    n_cond = len(CONDITIONS)
    assert [r[:2] for r in t["table1"]] == [[m, mode] for m in LABELS
                                            for mode in ("pre_softmax_mask", "post_softmax_zero")]
    # the cells are the JSON's numbers, in the paper's format
    ko = results["models"][1]["knockout"]
    acc = ko["text→image:post_softmax_zero"]
    assert t["table1"][3][3] == (f"{acc['accuracy']:.3f} ({acc['std']:.3f})").replace("0.", ".")
    for name in ("outputs", "per_category", "circular"):
        assert [r[:2] for r in t[name]] == [[m, c] for m in LABELS for c in CONDITIONS], name
    cats = list(ko["none"]["per_category"])
    assert len(t["per_category"][0]) == 3 + len(cats)
    letters = [int(r[4].split("(")[1].rstrip(")")) for r in t["outputs"]]
    assert letters == [results["models"][i]["knockout"][c]["outputs"]["letter"] for i in range(2) for c in CONDITIONS]
    assert len(t["share:toy_gemma3"]) == runs[1].n_layers and len(t["received:toy_qwen2_5_vl"]) == runs[0].n_layers
    # examples: every example row has the outputs under every condition
    ex = [k for k in t if k.startswith("example_outputs:")]
    assert len(ex) == 2 * len(runs[0].examples) and all(len(t[k]) == n_cond for k in ex)
    raw = {r[0]: r[1] for r in t[f"example_outputs:toy_gemma3:{runs[1].examples[0]['index']}"]}
    rec = next(x for x in ko["none"]["items"] if x["index"] == runs[1].examples[0]["index"])
    assert raw["none"] == repr(rec["raw"])


def test_two_models_page_figures_sections_and_footer(written, monkeypatch):
    cfg, runs, results, out = written
    text = (out / "report.html").read_text()
    page = parse(text)
    figs = page.figures
    n_examples = len(runs[0].examples)
    assert len(figs) == 1 + 2 + 2 + 2 * n_examples  # Table 1, Fig. 1 and Fig. 2 per model, example rows
    assert all(int(f["data-text-boxes"]) > 5 and f["data-layout-problems"] == "0" for f in figs), figs
    # the optional section: one block per model, in model order, inside one section element
    assert [s.get("data-analysis") or s["data-model"] for s in page.sections] == ["logit_lens", *LABELS]
    assert text.count("Logit lens on the image tokens") >= 2
    # what a newcomer reads: the paper's title, not internal names
    visible = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", text, flags=re.S)
    visible = re.sub(r'src="data:[^"]*"', "", visible)
    assert "Visual information flow paths in large vision-language models" in visible
    for jargon in ("seed 000", "seed-000", "METHODS", "§", "TOY_MODEL_NOTES"):
        assert jargon not in visible, jargon
    footer = {r[0]: r[1] for r in page.tables["run_info"]}
    import torch

    assert f"torch {torch.__version__}" in footer["versions"] and footer["dtype"] == "float32"
    assert footer["device"].startswith("cpu") and "s in all" in footer["wall time"]
    # the command reproduces the configuration
    seen = {}
    monkeypatch.setattr("mechvlm.report.run_report", lambda c: seen.setdefault("cfg", c))
    cli.main(shlex.split(footer["command"])[1:])
    for field in ("models", "limit", "batch_size", "analyses", "out", "conditions", "examples", "dtype"):
        assert getattr(seen["cfg"], field) == getattr(cfg, field), field


def test_four_model_page_has_no_figure_overlaps(written):
    cfg, runs, results, out = written
    page = build_page(relabelled(runs, LONG_LABELS), n_items=LIMIT, tsv="MMBench_DEV_EN.tsv",
                      info=written[2]["run"])
    parsed = parse(page.html())
    assert len(parsed.tables["table1"]) == 8
    assert all(f["data-layout-problems"] == "0" for f in parsed.figures)
    assert [s.get("data-analysis") or s["data-model"] for s in parsed.sections] == ["logit_lens", *LONG_LABELS]


def test_tables_of_a_split_without_answers():
    """Test-split TSVs have no answers: no accuracy, still the output kinds; nothing crashes."""
    from mechvlm.report import tables
    from mechvlm.viz import fig_table1, layout_problems

    recs = [{"index": i, "answer": None, "prediction": "A", "kind": "letter", "category": "c"} for i in range(3)]
    s = score_records(recs)
    assert s["accuracy"] is None
    ko = {"m": {"none": {**s, "condition": CONDITIONS["none"].describe()},
                "text→image:pre_softmax_mask": {**s, "condition": CONDITIONS["text→image:pre_softmax_mask"].describe()}}}
    t = parse(tables.table1_html(ko, 3) + tables.outputs_html(ko) + tables.per_category_html(ko)
              + tables.circular_html(ko)).tables
    assert t["table1"][0][2] == "-" and t["outputs"][0][4] == "1.000 (3)"
    fig = fig_table1(ko)
    assert not [p for ax in fig.axes for p in ax.patches] and layout_problems(fig) == []


def test_layers_shown_are_every_layer_or_evenly_spaced():
    from mechvlm.report.examples import layers_shown

    assert layers_shown(4) == [0, 1, 2, 3]
    deep = layers_shown(36)
    assert len(deep) == 8 and deep[0] == 0 and deep[-1] == 35
    gaps = np.diff(deep)
    assert gaps.max() - gaps.min() <= 1
