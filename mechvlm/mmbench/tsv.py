"""MMBench TSV files: `load_mmbench` (with the real file's quirks) and `write_mmbench`.

The layout is that of the files VLMEvalKit downloads (``MMBench_DEV_EN.tsv``, ...):

    index  question  hint  A  B  C  D  answer  category  image  source  l2-category  comment  split

Quirks handled (as VLMEvalKit's ``ImageBaseDataset.__init__``, ``vlmeval/dataset/image_base.py``,
reads them through ``pandas.read_csv(sep="\\t")``):

* ``image`` is a base64-encoded image, or -- when it has 64 characters or fewer -- the
  ``index`` of another row whose image it reuses (that row must hold a real image; the
  references are not chained). An empty ``image`` means no image.
* Missing values: ``hint``, ``C``, ``D`` (and ``answer`` in the test split) may be empty
  or a NaN marker. Every string that ``pandas.read_csv`` reads as NaN by default counts as
  missing (`NA_STRINGS`), so an option written ``None`` or ``NA`` is missing here exactly
  as it is for VLMEvalKit.
* Options are all single-letter upper-case columns ``A``..``Z`` that are present, in
  letter order (MMBench has A-D; a gap such as A, B, D is kept as it is).
* Circular evaluation: copy ``k`` of question ``i`` has index ``i + k * 1_000_000`` (its
  options rotated); ``MMBenchItem.group`` is ``index % 1_000_000``.
* Optional columns (``source``, ``comment``, ``l2-category``, ``split``, and also
  ``hint``, ``answer``, ``category``, ``image``, ``C``, ``D``) may be absent.
* Fields are large (base64 images): the csv field-size limit is raised.

What is refused, with a `MMBenchFormatError` naming the TSV line and the row's index, at
load time (before any model is loaded): bytes that are not UTF-8, a row with more or fewer
fields than the header, an answer that is not one of the row's option letters (``E`` with
options A-D, ``a``, ``AB``), and (`check_item_images`) an image that is not valid base64
or does not decode completely (a truncated file).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mechvlm.fileio import atomic_write

#: Copy ``k`` of a circular question has index ``index + k * CIRCULAR_OFFSET``.
CIRCULAR_OFFSET = 1_000_000
#: An ``image`` cell this short (and not empty) is the index of another row.
IMAGE_REF_MAX_CHARS = 64
#: The column order of the real MMBench TSV files.
COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
           "source", "l2-category", "comment", "split")
REQUIRED_COLUMNS = ("index", "question", "A", "B")
#: The strings ``pandas.read_csv`` reads as NaN by default (its ``STR_NA_VALUES``), plus
#: whitespace-only cells. VLMEvalKit loads the TSV with pandas, so these are "missing".
NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
OPTION_LETTERS = tuple(string.ascii_uppercase)


class MMBenchFormatError(ValueError):
    """A TSV that does not follow the MMBench layout (the message names the row)."""


@dataclass(frozen=True)
class MMBenchItem:
    """One row of an MMBench TSV, with its image reference resolved.

    Attributes:
        index: the row's ``index`` (``group + copy * 1_000_000`` for circular copies).
        question: the question text.
        hint: the hint, or None when missing.
        options: ``{letter: text}`` for the options present, in letter order.
        answer: the correct letter, or None (test split).
        category, l2_category: MMBench's leaf and level-2 ability ("" when absent).
        split: ``dev`` / ``test`` / ... ("" when absent).
        image: the base64-encoded image (references already resolved), or None.
        source, comment: the optional columns ("" when absent).
    """

    index: int
    question: str
    options: dict[str, str]
    hint: str | None = None
    answer: str | None = None
    category: str = ""
    l2_category: str = ""
    split: str = ""
    image: str | None = field(default=None, repr=False)
    source: str = ""
    comment: str = ""
    line: int = field(default=0, compare=False, repr=False)  # the TSV line (0: not from a file)

    @property
    def group(self) -> int:
        """The circular group: the index of the original question (``index % 1e6``)."""
        return self.index % CIRCULAR_OFFSET

    @property
    def circular_copy(self) -> int:
        """Which circular copy this row is (0 = the original question)."""
        return self.index // CIRCULAR_OFFSET

    def pil_image(self):
        """The image as an RGB ``PIL.Image`` (needs Pillow)."""
        if self.image is None:
            raise ValueError(f"MMBench item {self.index} has no image")
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover
            raise ImportError("MMBenchItem.pil_image() needs Pillow (pip install pillow)") from e
        try:
            img = Image.open(io.BytesIO(base64.b64decode(self.image)))
            return img.convert("RGB")
        except (ValueError, OSError, SyntaxError) as e:  # binascii.Error, UnidentifiedImageError, truncated
            raise MMBenchFormatError(f"{self.where()}: the image does not decode ({type(e).__name__}: {e})") from e

    def where(self) -> str:
        """``line 7 (index 3)`` for messages."""
        return f"line {self.line} (index {self.index})" if self.line else f"index {self.index}"


def is_missing(value: str | None) -> bool:
    """True for None, empty/whitespace-only cells and pandas' default NaN markers."""
    return value is None or value.strip() in NA_STRINGS


def _raise_field_size_limit() -> None:
    limit = sys.maxsize
    while True:  # sys.maxsize overflows a C long on some platforms
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _parse_index(value: str, row: int) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if f.is_integer():
        return int(f)
    raise MMBenchFormatError(f"row {row}: index {value!r} is not an integer")


def _read_text(path) -> str:
    """The file as text (a leading BOM dropped); bytes that are not UTF-8 raise, naming the
    line and the index of the row they are in."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        head = data[data.rfind(b"\n", 0, e.start) + 1:e.start]  # the line up to the bad byte
        where = f"line {line}"
        if line > 1 and b"\t" in head:
            index = head.split(b"\t", 1)[0].decode("utf-8", "replace").strip()
            where += f" (index {index})"
        raise MMBenchFormatError(f"{path}, {where}: byte 0x{data[e.start]:02x} at offset {e.start} is not "
                                 "UTF-8; MMBench TSVs are UTF-8 text") from None


def load_mmbench(path: str | os.PathLike, *, check_images: bool = True) -> list[MMBenchItem]:
    """Read an MMBench TSV into `MMBenchItem` rows, in file order (quirks: see the module).

    Raises `MMBenchFormatError` (naming the line and index) for a missing required column
    (index, question, A, B), a duplicate or non-integer index, bytes that are not UTF-8, a
    row with the wrong number of fields, an answer that is not one of the row's option
    letters, an image reference to a row that does not exist or has no image of its own,
    and (``check_images``, `check_item_images`) an image that does not decode.
    """
    _raise_field_size_limit()
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
    try:
        header = next(reader)
    except StopIteration:
        raise MMBenchFormatError(f"{path}: empty file (no header)") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise MMBenchFormatError(f"{path}: missing column(s) {missing}; header is {header}")
    rows = []
    for values in reader:
        line_no = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise MMBenchFormatError(
                f"{path}, line {line_no} (index {values[0].strip()}): {len(values)} fields for "
                f"{len(header)} columns (a tab too many or too few, or an unclosed quote)")
        rows.append((line_no, dict(zip(header, values))))

    def cell(row: Mapping[str, str], col: str) -> str | None:
        v = row.get(col)
        return None if is_missing(v) else v

    indices: dict[int, int] = {}
    for line_no, row in rows:
        idx = _parse_index(row["index"].strip(), line_no)
        if idx in indices:
            raise MMBenchFormatError(f"{path}: index {idx} appears on lines {indices[idx]} and {line_no}")
        indices[idx] = line_no
    raw_images = {_parse_index(r["index"].strip(), n): (cell(r, "image") or "").strip() for n, r in rows}

    letters = [c for c in header if c in OPTION_LETTERS]
    letters.sort()
    items = []
    for line_no, row in rows:
        idx = _parse_index(row["index"].strip(), line_no)
        image = raw_images[idx] or None
        if image is not None and len(image) <= IMAGE_REF_MAX_CHARS:
            image = _resolve_image_ref(path, idx, image, raw_images)
        answer = cell(row, "answer")
        options = {c: row[c] for c in letters if cell(row, c) is not None}
        if answer is not None and answer.strip() not in options:
            raise MMBenchFormatError(
                f"{path}, line {line_no} (index {idx}): answer {answer.strip()!r} is not one of the row's "
                f"option letters {list(options)}")
        items.append(MMBenchItem(
            index=idx,
            question=row["question"],
            hint=cell(row, "hint"),
            options=options,
            answer=answer.strip() if answer is not None else None,
            category=cell(row, "category") or "",
            l2_category=cell(row, "l2-category") or "",
            split=cell(row, "split") or "",
            image=image,
            source=cell(row, "source") or "",
            comment=cell(row, "comment") or "",
            line=line_no,
        ))
    if check_images:
        check_item_images(items, path)
    return items


def check_item_images(items: Iterable[MMBenchItem], path: str | os.PathLike | None = None) -> None:
    """Decode every image of ``items`` completely (each distinct image once): broken base64,
    a file that is not an image and a truncated image raise `MMBenchFormatError` naming the
    line and index of the first row that uses it. Costs a few ms per image."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return
    seen: set[int] = set()
    for it in items:
        if it.image is None or id(it.image) in seen:
            continue
        seen.add(id(it.image))
        try:
            data = base64.b64decode(it.image)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except (ValueError, OSError, SyntaxError) as e:  # binascii.Error, UnidentifiedImageError, truncated
            where = f"{path}, {it.where()}" if path is not None else it.where()
            raise MMBenchFormatError(f"{where}: the image is not a complete base64-encoded image "
                                     f"({type(e).__name__}: {e})") from e


def _resolve_image_ref(path, idx: int, ref: str, raw_images: Mapping[int, str]) -> str:
    try:
        target = _parse_index(ref, 0)
    except MMBenchFormatError:
        raise MMBenchFormatError(
            f"{path}: row {idx} has a {len(ref)}-character image {ref!r}, which is neither base64 "
            f"nor the index of another row") from None
    if target not in raw_images:
        raise MMBenchFormatError(
            f"{path}: row {idx} reuses the image of row {target}, but there is no row {target}")
    image = raw_images[target]
    if len(image) <= IMAGE_REF_MAX_CHARS:
        raise MMBenchFormatError(
            f"{path}: row {idx} reuses the image of row {target}, but row {target} has no image of "
            f"its own ({image!r})")
    return image


def _item_row(item: MMBenchItem) -> dict[str, str]:
    row = {"index": str(item.index), "question": item.question, "hint": item.hint or "",
           "answer": item.answer or "", "category": item.category, "image": item.image or "",
           "source": item.source, "l2-category": item.l2_category, "comment": item.comment,
           "split": item.split}
    row.update(item.options)
    return row


def write_mmbench(items_or_rows: Iterable[MMBenchItem | Mapping], path: str | os.PathLike, *,
                  dedupe_images: bool = True) -> None:
    """Write rows as an MMBench TSV in the real column order (`COLUMNS`; option columns
    beyond D, if any, go right after D).

    Each row is an `MMBenchItem` or a mapping with column names as keys (``l2_category``
    is accepted for ``l2-category``; missing keys and None are written empty). Mapping rows
    are written as given, so an ``image`` may already be another row's index.

    ``dedupe_images``: a full image equal to that of an earlier row is written as that
    row's index, as the real files store circular copies; `load_mmbench` resolves it.
    """
    rows = []
    for r in items_or_rows:
        if isinstance(r, MMBenchItem):
            if r.image is not None and len(r.image) <= IMAGE_REF_MAX_CHARS:
                raise ValueError(f"item {r.index}: an image of {len(r.image)} characters would read "
                                 f"back as a reference to another row; images must be longer than "
                                 f"{IMAGE_REF_MAX_CHARS} characters")
            rows.append(_item_row(r))
        else:
            row = {("l2-category" if k == "l2_category" else str(k)): v for k, v in r.items()}
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
    extra = sorted({k for row in rows for k in row if k in OPTION_LETTERS} - set(COLUMNS))
    columns = list(COLUMNS[:7]) + extra + list(COLUMNS[7:])
    unknown = sorted({k for row in rows for k in row} - set(columns))
    if unknown:
        raise ValueError(f"unknown MMBench column(s) {unknown}; columns are {columns}")
    if dedupe_images:
        first: dict[str, str] = {}
        for row in rows:
            img = row.get("image", "")
            if len(img) > IMAGE_REF_MAX_CHARS:
                if img in first:
                    row["image"] = first[img]
                else:
                    first[img] = row["index"]
    _raise_field_size_limit()
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:  # never a half-written TSV
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
