"""MMBench TSV loader / writer on hand-written files with every quirk of the real ones,
and the seed-000 prompt."""

from __future__ import annotations

import base64
import io

import pytest

from mechvlm.mmbench import (
    MMBenchFormatError,
    MMBenchItem,
    load_mmbench,
    mmbench_prompt,
    write_mmbench,
)
from mechvlm.mmbench.tsv import COLUMNS


def png_b64(color, size=(6, 4)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RED, BLUE = png_b64((255, 0, 0)), png_b64((0, 0, 255), size=(3, 5))
HEADER = "\t".join(COLUMNS)


def write(tmp_path, text: str, name="mmb.tsv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def full_file(tmp_path):
    """Rows: a plain question; an image reference + 'nan' hint + empty D; empty hint and
    NaN C/D; a quoted multi-line question; two circular copies of row 1 (image by
    reference, options rotated); an item of the test split without answer."""
    rows = [
        ["1", "What color is the shape?", "Look at the center.", "red", "blue", "green", "yellow", "A",
         "color_attribute", RED, "synthetic", "attribute_reasoning", "", "dev"],
        ["2", "Which shape is it?", "nan", "circle", "square", "cross", "", "C",
         "shape", "1", "synthetic", "attribute_reasoning", "", "dev"],
        ["3", "Is there a shape?", "", "yes", "no", "NaN", "nan", "B",
         "existence", BLUE, "", "", "", "dev"],
        ["4", '"Line one\nline two, with ""quotes"" and a\ttab"', "NaN", "x", "y", "z", "w", "D",
         "ocr", "3", "", "", "a comment", "dev"],
        ["1000001", "What color is the shape?", "Look at the center.", "yellow", "red", "blue", "green", "B",
         "color_attribute", "1", "synthetic", "attribute_reasoning", "", "dev"],
        ["2000001", "What color is the shape?", "Look at the center.", "green", "yellow", "red", "blue", "C",
         "color_attribute", "1", "synthetic", "attribute_reasoning", "", "dev"],
        ["5", "Count them.", "", "1", "2", "3", "4", "", "count", BLUE, "", "", "", "test"],
    ]
    return write(tmp_path, HEADER + "\n" + "\n".join("\t".join(r) for r in rows) + "\n")


def test_loader_handles_every_quirk(tmp_path):
    items = load_mmbench(full_file(tmp_path))
    by = {it.index: it for it in items}
    assert [it.index for it in items] == [1, 2, 3, 4, 1000001, 2000001, 5]  # file order
    one = by[1]
    assert one.question == "What color is the shape?" and one.hint == "Look at the center."
    assert one.options == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert (one.answer, one.category, one.l2_category, one.split, one.source) == \
        ("A", "color_attribute", "attribute_reasoning", "dev", "synthetic")
    assert one.image == RED and one.group == 1 and one.circular_copy == 0
    # image reference to another row; 'nan' hint; empty D
    assert by[2].image == RED and by[2].hint is None
    assert by[2].options == {"A": "circle", "B": "square", "C": "cross"}
    # empty hint; NaN-like C and D
    assert by[3].hint is None and by[3].options == {"A": "yes", "B": "no"} and by[3].source == ""
    # a quoted field with a newline, doubled quotes and a tab; a reference to row 3's image
    assert by[4].question == 'Line one\nline two, with "quotes" and a\ttab'
    assert by[4].image == BLUE and by[4].comment == "a comment"
    # circular copies: index + k * 1e6, same group, image by reference
    for idx, k, ans in [(1000001, 1, "B"), (2000001, 2, "C")]:
        it = by[idx]
        assert (it.group, it.circular_copy, it.answer, it.image) == (1, k, ans, RED)
    assert by[1000001].options["B"] == "red"
    # test split: no answer
    assert by[5].answer is None and by[5].split == "test"


def test_pil_image_decodes(tmp_path):
    items = {it.index: it for it in load_mmbench(full_file(tmp_path))}
    img = items[2].pil_image()  # through the reference
    assert img.mode == "RGB" and img.size == (6, 4) and img.getpixel((0, 0)) == (255, 0, 0)
    assert items[3].pil_image().size == (3, 5)
    with pytest.raises(ValueError, match="no image"):
        MMBenchItem(index=9, question="q", options={"A": "a"}).pil_image()


def test_optional_columns_absent(tmp_path):
    text = ("\ufeffindex\tquestion\tA\tB\tC\tanswer\tcategory\timage\n"  # with a byte-order mark
            f"7\tWhat?\tfoo\tbar\t\tB\tmisc\t{RED}\n"
            "8\tAnd?\tfoo\tbar\tbaz\tC\tmisc\t7\n")
    a, b = load_mmbench(write(tmp_path, text))
    assert a.hint is None and a.options == {"A": "foo", "B": "bar"} and a.answer == "B"
    assert (a.l2_category, a.split, a.source, a.comment) == ("", "", "", "")
    assert b.image == RED and b.options == {"A": "foo", "B": "bar", "C": "baz"}


def test_missing_option_in_the_middle_is_skipped(tmp_path):
    text = f"index\tquestion\tA\tB\tC\tD\tanswer\timage\n1\tq\ta\tb\t\td\tD\t{RED}\n"
    (it,) = load_mmbench(write(tmp_path, text))
    assert list(it.options) == ["A", "B", "D"]


def test_bad_image_reference_names_both_rows(tmp_path):
    row = "3\tq\t\ta\tb\t\t\tA\tc\t{image}\t\t\t\t\n"
    text = HEADER + "\n" + row.format(image="42")
    with pytest.raises(MMBenchFormatError, match=r"row 3 .*row 42.*no row 42"):
        load_mmbench(write(tmp_path, text))
    text = HEADER + "\n" + row.format(image="4") + row.replace("3", "4", 1).format(image="")
    with pytest.raises(MMBenchFormatError, match=r"row 3 .*row 4.*no image of its own"):
        load_mmbench(write(tmp_path, text))


def test_format_errors(tmp_path):
    with pytest.raises(MMBenchFormatError, match="missing column"):
        load_mmbench(write(tmp_path, "index\tquestion\tA\n1\tq\ta\n"))
    with pytest.raises(MMBenchFormatError, match="index 1 appears"):
        load_mmbench(write(tmp_path, "index\tquestion\tA\tB\n1\tq\ta\tb\n1\tq\ta\tb\n"))
    with pytest.raises(MMBenchFormatError, match="not an integer"):
        load_mmbench(write(tmp_path, "index\tquestion\tA\tB\nx1\tq\ta\tb\n"))
    with pytest.raises(MMBenchFormatError, match="fields"):
        load_mmbench(write(tmp_path, "index\tquestion\tA\tB\n1\tq\ta\n"))


def test_large_fields(tmp_path):
    big = png_b64((1, 2, 3), size=(400, 400)) + "A" * 300_000  # > csv's default 131072 limit
    (it,) = load_mmbench(write(tmp_path, f"index\tquestion\tA\tB\timage\n1\tq\ta\tb\t{big}\n"))
    assert it.image == big


def test_write_round_trip_and_layout(tmp_path):
    items = load_mmbench(full_file(tmp_path))
    out = tmp_path / "out.tsv"
    write_mmbench(items, out)
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[0].split("\t") == list(COLUMNS)
    assert load_mmbench(out) == items
    # images repeated in later rows are written as the index of the first row that has them
    import csv
    with open(out, newline="", encoding="utf-8") as f:
        rows = {r["index"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert rows["1"]["image"] == RED and rows["2"]["image"] == "1" and rows["1000001"]["image"] == "1"
    assert rows["4"]["image"] == "3" and rows["5"]["image"] == "3"
    out2 = tmp_path / "out2.tsv"
    write_mmbench(items, out2, dedupe_images=False)
    assert load_mmbench(out2) == items
    assert out2.stat().st_size > out.stat().st_size


def test_write_mapping_rows(tmp_path):
    rows = [{"index": 1, "question": "q?", "A": "x", "B": "y", "answer": "A", "category": "c",
             "image": RED, "l2_category": "L2"},
            {"index": 1000001, "question": "q?", "A": "y", "B": "x", "answer": "B", "category": "c",
             "image": "1", "hint": None}]
    write_mmbench(rows, tmp_path / "m.tsv")
    a, b = load_mmbench(tmp_path / "m.tsv")
    assert a.l2_category == "L2" and b.image == RED and b.hint is None and b.group == 1
    with pytest.raises(ValueError, match="unknown MMBench column"):
        write_mmbench([{"index": 1, "question": "q", "A": "a", "B": "b", "bogus": 1}], tmp_path / "x.tsv")
    with pytest.raises(ValueError, match="reference"):
        write_mmbench([MMBenchItem(index=1, question="q", options={"A": "a"}, image="12")], tmp_path / "y.tsv")


def test_prompt_exact():
    item = MMBenchItem(index=1, question="What color is the shape?", hint="Look at the center.",
                       options={"A": "red", "B": "blue", "C": "green", "D": "yellow"})
    assert mmbench_prompt(item) == (
        "Look at the center.\n"
        "What color is the shape?\n"
        "A. red\n"
        "B. blue\n"
        "C. green\n"
        "D. yellow\n"
        "Answer with the option's letter from the given choices directly.")


def test_prompt_without_hint_and_with_two_options(tmp_path):
    by = {it.index: it for it in load_mmbench(full_file(tmp_path))}
    assert mmbench_prompt(by[3]) == ("Is there a shape?\nA. yes\nB. no\n"
                                     "Answer with the option's letter from the given choices directly.")
    assert mmbench_prompt(by[2]).splitlines()[:2] == ["Which shape is it?", "A. circle"]
    blank = MMBenchItem(index=1, question="Q", hint="  ", options={"A": "a", "B": "b"})
    assert mmbench_prompt(blank).startswith("Q\nA. a\n")
