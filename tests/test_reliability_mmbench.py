"""The MMBench path: a malformed TSV fails at once naming its line and index; a test split
runs to the end; CSV cells cannot run as formulas; text from data never crashes matplotlib.

Before issue 12: an answer outside the options was scored wrong in silence; a broken or
truncated image, non-UTF-8 bytes and a ragged row failed (if at all) with a low-level error
after the model had loaded; a TSV without answers crashed in the figure after the whole
compute; CSV cells were written verbatim; a ``$x^$`` label crashed the figure."""

from __future__ import annotations

import base64
import csv
import json

import pytest

from mechvlm.cli import main
from mechvlm.mmbench import MMBenchFormatError, load_mmbench
from mechvlm.mmbench.report_tables import save_results
from mechvlm.toy.benchmark import SHIPPED_TSV
from mechvlm.toy.checkpoint import SHIPPED

LINES = SHIPPED_TSV.read_text(encoding="utf-8").splitlines()
HEADER = LINES[0].split("\t")
COL = {c: i for i, c in enumerate(HEADER)}


def _tsv(tmp_path, lines, name="bad.tsv"):
    p = tmp_path / name
    data = b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines) + b"\n"
    p.write_bytes(data)
    return p


def _edit(line: str, **cells) -> str:
    f = line.split("\t")
    for k, v in cells.items():
        f[COL[k]] = v
    return "\t".join(f)


def _no_model(monkeypatch):
    """Fail loudly if the report loads a model (the TSV must be checked first)."""
    from mechvlm import HookedVLM

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the TSV was checked")

    monkeypatch.setattr(HookedVLM, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


@pytest.mark.parametrize("answer", ["E", "a", "AB"])
def test_answer_that_is_not_an_option_letter(tmp_path, answer):
    bad = _tsv(tmp_path, [LINES[0], LINES[1], _edit(LINES[5], answer=answer)])
    idx = LINES[5].split("\t")[0]
    with pytest.raises(MMBenchFormatError, match=rf"line 3 \(index {idx}\): answer '{answer}' is not one of "
                                                 r"the row's option letters \['A', 'B', 'C', 'D'\]"):
        load_mmbench(bad)


def _bad_files(tmp_path) -> dict:
    img = LINES[1].split("\t")[COL["image"]]
    half = base64.b64encode(base64.b64decode(img)[:len(base64.b64decode(img)) // 2]).decode()
    line6 = LINES[5]
    idx = line6.split("\t")[0]
    return {
        "broken base64": (_tsv(tmp_path, [LINES[0], _edit(LINES[1], image="not base64 at all! " * 8)], "b64.tsv"),
                          r"line 2 \(index 0\): the image is not a complete base64-encoded image"),
        "truncated image": (_tsv(tmp_path, [LINES[0], _edit(LINES[1], image=half)], "trunc.tsv"),
                            r"line 2 \(index 0\): the image is not a complete .*truncated"),
        "non-UTF-8": (_tsv(tmp_path, [LINES[0], LINES[1], line6.encode().replace(b"shape", b"sh\xe9pe", 1)],
                           "latin1.tsv"),
                      rf"line 3 \(index {idx}\): byte 0xe9 .* is not UTF-8"),
        "ragged row": (_tsv(tmp_path, [LINES[0], LINES[1], line6 + "\textra"], "ragged.tsv"),
                       rf"line 3 \(index {idx}\): 15 fields for 14 columns"),
    }


@pytest.mark.parametrize("case", ["broken base64", "truncated image", "non-UTF-8", "ragged row"])
def test_malformed_tsv_names_line_and_index(tmp_path, case):
    path, pattern = _bad_files(tmp_path)[case]
    with pytest.raises(MMBenchFormatError, match=pattern):
        load_mmbench(path)


@pytest.mark.parametrize("case", ["broken base64", "truncated image", "non-UTF-8", "ragged row"])
def test_malformed_tsv_fails_before_the_model_loads(tmp_path, monkeypatch, case):
    path, pattern = _bad_files(tmp_path)[case]
    _no_model(monkeypatch)
    with pytest.raises(MMBenchFormatError, match=pattern):
        main(["report", "--mmbench", str(path), "--out", str(tmp_path / "r"), "--no-progress"])


def test_broken_image_past_the_limit_does_not_stop_a_limited_run(tmp_path, monkeypatch):
    """--limit N checks the images of the N rows it evaluates (a later broken one is not read)."""
    from mechvlm.mmbench import check_item_images

    bad = _tsv(tmp_path, [LINES[0], LINES[1], _edit(LINES[5], image="not base64 at all! " * 8)])
    items = load_mmbench(bad, check_images=False)
    check_item_images(items[:1], bad)
    with pytest.raises(MMBenchFormatError, match=r"line 3"):
        check_item_images(items, bad)


# --- CSV cells never run as formulas --------------------------------------------------------

def test_csv_cells_starting_with_formula_characters_are_quoted(tmp_path):
    hostile = ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)", "\tTAB", "\rCR"]
    items = [{"index": i, "group": i, "category": "-cat", "l2_category": "", "answer": "A", "prediction": None,
              "kind": "other", "correct": False, "stopped": True, "raw": raw} for i, raw in enumerate(hostile)]
    summary = {"accuracy": 0.0, "std": 0.0, "n": len(items), "n_items": len(items), "items": items,
               "condition": {"name": "=cond", "direction": "none", "mode": None}}
    paths = save_results({"@model": {"=cond": summary}}, tmp_path)
    with open(paths["items"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["raw"] for r in rows] == ["'" + h for h in hostile]
    assert {r["model"] for r in rows} == {"'@model"} and {r["category"] for r in rows} == {"'-cat"}
    with open(paths["summary"], newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["condition"] == "'=cond" and row["accuracy"] == "0.0"  # numbers stay numbers
    # the JSON keeps the values as they are
    assert json.loads(paths["json"].read_text())["@model"]["=cond"]["items"][0]["raw"] == hostile[0]


# --- matplotlib: text from data is never parsed as mathtext ----------------------------------

MATH = "$x^$"


def _draw(fig):
    from mechvlm.viz.html import figure_to_img_html

    return figure_to_img_html(fig, close=True)


def test_knockout_figure_with_dollar_labels():
    from mechvlm.viz import fig_knockout

    table = {f"model {MATH}": {f"none {MATH}": (0.5, 0.5, 10), "text→image": (0.25, 0.43, 10)}}
    assert "data:image/png;base64," in _draw(fig_knockout(table))


def test_metric_figures_with_dollar_names_and_tokens(qwen_model, image_batch):
    from mechvlm import attention_share, received_attention
    from mechvlm.viz import fig_attention_share, fig_received_attention, head_thumbnails

    share = attention_share(qwen_model, image_batch, progress=False)
    received = received_attention(qwen_model, image_batch, progress=False)
    _draw(fig_attention_share({f"{MATH} model": share}))
    _draw(fig_received_attention({f"{MATH} model": received}))
    _, cache = qwen_model.run_with_cache(**image_batch, names_filter="blocks.0.attn.hook_pattern")
    roles = qwen_model.roles(**image_batch)
    n = image_batch["input_ids"].shape[1]
    _draw(head_thumbnails(cache, roles, layer=0, labels=[f"{MATH}{i}" for i in range(n)], tick_labels=True))


def test_knockout_figure_of_an_unscored_run():
    from mechvlm.viz import fig_knockout, knockout_table_html

    table = {"none": {"accuracy": None, "std": None, "n": 0, "outputs": {"letter": 3, "eos_only": 1, "other": 0}}}
    assert "data:image/png;base64," in _draw(fig_knockout(table))
    assert "n/a" in knockout_table_html(table).fragment()


# --- a test split (no answer column) runs to the end ------------------------------------------

def test_report_on_a_test_split_without_answers_from_a_dollar_path(tmp_path, capsys):
    import shutil

    rows = [line.split("\t") for line in LINES[:9]]
    keep = [i for i, c in enumerate(HEADER) if c != "answer"]
    tsv = _tsv(tmp_path, ["\t".join(r[i] for i in keep) for r in rows], "test_split.tsv")
    model = tmp_path / f"toy {MATH}"  # a path whose name matplotlib would read as math
    shutil.copytree(SHIPPED["qwen2_5_vl"], model)
    out = tmp_path / "r"
    assert main(["report", "--model", str(model), "--mmbench", str(tsv), "--out", str(out), "--no-progress",
                 "--limit", "4", "--batch-size", "4", "--conditions", "none,text->image:pre_softmax_mask"]) == 0
    res = json.loads((out / "results.json").read_text())
    for cond in res["knockout"].values():
        assert cond["accuracy"] is None and cond["n_items"] == 4 and sum(cond["outputs"].values()) == 4
    with open(out / "mmbench_items.csv", newline="", encoding="utf-8") as f:
        items = list(csv.DictReader(f))
    assert len(items) == 8 and all(r["kind"] in ("letter", "eos_only", "other") for r in items)
    assert all(r["answer"] == "" for r in items) and any(r["prediction"] for r in items)
    html = (out / "report.html").read_text()
    assert "Accuracy is not available" in html and html.rstrip().endswith("</html>")
    assert "accuracy: not available" in capsys.readouterr().out
